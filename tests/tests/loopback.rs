//! A client/server pair over loopback, IPv4 and IPv6: the agent reports
//! exactly the transitions the kernel made, with owners and durations, with
//! each kernel program: the BTF one (the default here: fields read from the
//! socket), and the classic ones (fields at fixed offsets, or at tracefs
//! offsets, in the tracepoint's record).

use tcptrace_tests::{assert_pair, own_netns, peer_bin, play_pair, Agent};

fn loopback(host: &str, family: &str, args: &[&str]) {
    let agent = Agent::start(args);
    let program = match args {
        ["--state-program", "offsets"] => "inet_sock_set_state",
        ["--state-program", "fixed"] => "inet_sock_set_state_fixed",
        _ => "inet_sock_set_state_btf",
    };
    agent.wait_stderr(&format!("program {program},"));
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

/// The classic program for the usual record layout: what runs on kernels
/// without BTF.
#[test]
fn both_families_with_the_fixed_program() {
    loopback("127.0.0.1", "ipv4", &["--state-program", "fixed"]);
    loopback("::1", "ipv6", &["--state-program", "fixed"]);
}

/// The program that reads fields at the offsets tracefs gives: what runs on
/// kernels whose layout is not the usual one.
#[test]
fn both_families_with_the_offsets_program() {
    loopback("127.0.0.1", "ipv4", &["--state-program", "offsets"]);
    loopback("::1", "ipv6", &["--state-program", "offsets"]);
}
