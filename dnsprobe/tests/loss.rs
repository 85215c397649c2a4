//! Loss is never silent: with a deliberately tiny ring buffer and a burst of queries, the kernel
//! cannot hand every event over. The daemon must keep running, count what it lost, and every
//! query the client sent must be either reported or counted as a lost query event.
//!
//! The lost counters are machine-wide (a lost event has no cgroup yet), so this test lives in
//! its own binary: test binaries run one after another.

mod support;

use std::time::{Duration, Instant};

use support::{counter, skip_unless_root, Daemon, World, WorldConfig};

/// Queries in the burst: far more than a one-page ring buffer (17 events of queries and short
/// answers) can hold while the daemon drains it.
const QUERIES: u64 = 3000;

/// The value of `key=` in the last line of `text` that contains `marker`.
#[test]
fn tiny_ring_buffer_loses_events_counts_them_and_keeps_running() {
    if skip_unless_root("tiny_ring_buffer_loses_events_counts_them_and_keeps_running") {
        return;
    }
    let world = World::new(WorldConfig::default());
    let daemon = Daemon::start_with(&["--ring-buffer-size", "4096", "--stats-interval", "1s"]);
    let server = world.server_v4.to_string();
    // One connected socket, distinct ids, no waiting: a burst the ring cannot absorb.
    let script = format!(
        "import socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('{server}', 53))\n\
         name = b'\\x03www\\x04test\\x08internal\\x00'\n\
         for i in range({QUERIES}):\n    \
             s.send(struct.pack('>HHHHHH', i + 1, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1))\n"
    );
    world
        .run_client(&["python3", "-c", &script])
        .assert_success();

    // Every query ends as a record (answered, or unanswered after the 2 s query timeout) or was
    // never seen: its event was lost. Wait until the two add up, as the periodic stats line
    // tells the losses so far.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reported = daemon.records(&world.cgroup.path).len() as u64;
        let stderr = daemon.stderr();
        let lost = counter(&stderr, "stats:", "lost_query_events");
        let in_flight = counter(&stderr, "stats:", "in_flight");
        if lost.is_some_and(|l| reported + l >= QUERIES) && in_flight == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reported {reported} + lost {lost:?} never reached {QUERIES} (in flight {in_flight:?});\n\
             daemon stderr:\n{stderr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reported = daemon.records(&world.cgroup.path).len() as u64;
    assert!(
        daemon.is_running(),
        "the daemon died under loss:\n{}",
        daemon.stderr()
    );
    let stopped = daemon.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "daemon exit {:?}:\n{}",
        stopped.status,
        stopped.stderr
    );
    let lost_queries = counter(&stopped.stderr, "summary:", "lost_query_events")
        .unwrap_or_else(|| panic!("no summary with lost_query_events:\n{}", stopped.stderr));
    let lost_total = counter(&stopped.stderr, "summary:", "lost_events").unwrap_or_default();
    let lost_responses =
        counter(&stopped.stderr, "summary:", "lost_response_events").unwrap_or_default();
    assert!(
        lost_queries > 0,
        "a one-page ring lost no query event:\n{}",
        stopped.stderr
    );
    assert_eq!(
        lost_total,
        lost_queries + lost_responses,
        "{}",
        stopped.stderr
    );
    assert_eq!(
        reported + lost_queries,
        QUERIES,
        "reported {reported} + lost {lost_queries} != sent {QUERIES}:\n{}",
        stopped.stderr
    );
    // The loss was said while it happened, not only at exit.
    assert!(
        stopped.stderr.contains("ring buffer full"),
        "no warning about the full ring buffer:\n{}",
        stopped.stderr
    );
}
