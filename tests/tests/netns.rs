//! A client/server pair across two network namespaces joined by a veth
//! pair: the same transitions, each socket tagged with its own namespace.

use tcptrace_tests::{assert_pair, netns_pair, peer_bin, play_pair, Agent};

#[test]
fn pair_across_veth_namespaces() {
    let nets = netns_pair();
    let agent = Agent::start(&[]);
    let pair = play_pair(
        peer_bin!(),
        &agent,
        Some(&nets.a),
        Some(&nets.b),
        &nets.addr_a,
        true,
    );
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {:?}", stopped.status);
    assert_ne!(nets.a.inode(), nets.b.inode());
    assert_pair(
        &stopped.events,
        &pair,
        "ipv4",
        (&nets.addr_a, &nets.addr_b),
        (nets.a.inode(), nets.b.inode()),
    );
}
