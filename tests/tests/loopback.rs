//! A client/server pair over loopback, IPv4 and IPv6: the agent reports
//! exactly the transitions the kernel made, with owners and durations, with
//! either kernel program (fields at fixed offsets, or at tracefs offsets).

use tcptrace_tests::{assert_pair, own_netns, peer_bin, play_pair, Agent};

fn loopback(host: &str, family: &str, args: &[&str]) {
    let agent = Agent::start(args);
    let pair = play_pair(peer_bin!(), &agent, None, None, host, true);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {:?}", stopped.status);
    let ns = own_netns();
    assert_pair(&stopped.events, &pair, family, (host, host), (ns, ns));
}

#[test]
fn ipv4_loopback_pair() {
    loopback("127.0.0.1", "ipv4", &[]);
}

#[test]
fn ipv6_loopback_pair() {
    loopback("::1", "ipv6", &[]);
}

/// The program that reads fields at the offsets tracefs gives: what runs on
/// kernels whose layout is not the usual one.
#[test]
fn both_families_with_the_offsets_program() {
    loopback("127.0.0.1", "ipv4", &["--state-program", "offsets"]);
    loopback("::1", "ipv6", &["--state-program", "offsets"]);
}
