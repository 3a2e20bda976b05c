//! Free loopback ports known before a process binds them; shared with the benches.

/// `n` distinct free loopback ports, bound and released, for listeners a test starts moments
/// later. Picked below the kernel's ephemeral range (as `scripts/free-ports` does): a port
/// from `bind(0)` can be handed out again at once, to this test or to any other process
/// binding port 0 or connecting out, before the listener meant for it binds it (a cluster's
/// six ports held a duplicate about once in 800 starts; a server restarted on its port
/// could find it taken). All `n` are held until all are picked, so they differ.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    let bind = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).ok();
    for _ in 0..1000 {
        let held: Option<Vec<_>> = if ephemeral_low < low + 1000 {
            (0..n).map(|_| bind(0)).collect() // no room below: the kernel picks
        } else {
            let base = fastrand::u16(low..ephemeral_low - n as u16);
            (0..n as u16).map(|i| bind(base + i)).collect()
        };
        if let Some(held) = held {
            return held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        }
    }
    panic!("no {n} free loopback ports below {ephemeral_low}");
}
