//! The kernel programs against unusual and hostile packets: IPv4 options, an IPv6 extension
//! header, a query large enough to be fragmented on the wire, and a UDP length field that lies
//! (over IPv4, and over IPv6 behind an extension header).
//! The verifier already accepted the programs (the daemon started); here they must also read
//! these packets right: the right question, from the right client, matched with its answer.

mod support;

use support::{skip_unless_root, Daemon, World, WorldConfig, RECORD_TIMEOUT};

/// Python that builds a query for `name` with id `qid` (and optional EDNS padding) into `q`.
const QUERY_PY: &str = r#"
import socket, struct, sys
def query(name, qid, pad=0):
    q = struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 1 if pad else 0)
    for label in name.rstrip('.').split('.'):
        q += bytes([len(label)]) + label.encode()
    q += b'\x00' + struct.pack('>HH', 1, 1)
    if pad:
        # OPT record with a Padding option (RFC 7830) of `pad` bytes.
        q += b'\x00' + struct.pack('>HHIH', 41, 4096, 0, pad + 4) + struct.pack('>HH', 12, pad) + b'\x00' * pad
    return q
"#;

fn run_py(world: &World, body: &str) -> support::ClientRun {
    let script = format!("{QUERY_PY}\n{body}");
    world.run_client(&["python3", "-c", &script])
}

fn wait_record(daemon: &Daemon, world: &World, qname: &str) -> support::QueryRecord {
    let records = daemon.wait_for(
        &world.cgroup.path,
        &format!("the record of {qname}"),
        |r| r.iter().any(|r| r.qname == qname),
        RECORD_TIMEOUT,
    );
    records
        .into_iter()
        .find(|r| r.qname == qname)
        .expect("waited for it")
}

/// A query sent from a raw socket with a UDP length 100 bytes longer than the packet.
struct LengthLie {
    qname: String,
    qid: u16,
    /// The client's source port.
    port: u16,
    /// Python that opens the raw socket as `s`.
    socket_py: &'static str,
    server: String,
    /// The record's `client`, as the daemon writes it.
    client: String,
}

/// Sends `lie` and checks its record: the question and client read from the bytes that are
/// there, and the server's drop of it for its length (`PKT_TOO_SMALL`) read right by the drop
/// hook and linked to it.
fn assert_length_lie_dropped(daemon: &Daemon, world: &World, lie: &LengthLie) {
    let LengthLie {
        qname,
        qid,
        port,
        socket_py,
        server,
        client,
    } = lie;
    run_py(
        world,
        &format!(
            "q = query('{qname}', {qid})\n\
             {socket_py}\n\
             udp = struct.pack('>HHHH', {port}, 53, len(q) + 8 + 100, 0) + q\n\
             s.sendto(udp, ('{server}', 0))\n"
        ),
    )
    .assert_success();
    let r = wait_record(daemon, world, qname);
    assert_eq!(r.id, *qid, "{r:?}");
    assert_eq!(&r.client, client, "{r:?}");
    assert_eq!(r.outcome, "dropped", "{r:?}");
    assert!(
        r.drops
            .iter()
            .any(|d| d.reason == "PKT_TOO_SMALL" && d.dns_id == Some(*qid)),
        "{r:?}"
    );
}

#[test]
fn ip_options_extension_headers_fragments_and_length_lies_are_read_right() {
    if skip_unless_root("ip_options_extension_headers_fragments_and_length_lies_are_read_right") {
        return;
    }
    let world = World::new(WorldConfig::default());
    let daemon = Daemon::start();
    let tag = &world.tag;
    let v4 = world.server_v4.to_string();
    let v6 = world.server_v6.to_string();

    // IPv4 options (three NOPs and an end marker): the UDP header moves 4 bytes down.
    let name = format!("opts-{tag}.test.internal.");
    let run = run_py(
        &world,
        &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b'\\x01\\x01\\x01\\x00')\n\
             s.settimeout(3)\n\
             s.sendto(query('{name}', 4101), ('{v4}', 53))\n\
             print(len(s.recv(4096)))\n"
        ),
    );
    run.assert_success();
    let r = wait_record(&daemon, &world, &name);
    assert_eq!(r.id, 4101, "{r:?}");
    assert_eq!(r.outcome, "answered", "{r:?}");
    assert_eq!(r.rcode.as_deref(), Some("NXDOMAIN"), "{r:?}");
    assert_eq!(r.pid, Some(run.pid), "{r:?}");

    // An IPv6 destination-options header (PadN) before the UDP header.
    let name = format!("ext6-{tag}.test.internal.");
    let run = run_py(
        &world,
        &format!(
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n\
             s.settimeout(3)\n\
             s.sendto(query('{name}', 4102), ('{v6}', 53))\n\
             print(len(s.recv(4096)))\n"
        ),
    );
    run.assert_success();
    let r = wait_record(&daemon, &world, &name);
    assert_eq!(r.id, 4102, "{r:?}");
    assert_eq!(r.outcome, "answered", "{r:?}");
    assert_eq!(r.server, format!("[{v6}]:53"), "{r:?}");

    // A 3000-byte query: fragmented on the 1500-byte veth, whole at the socket hooks.
    let name = format!("big-{tag}.test.internal.");
    let run = run_py(
        &world,
        &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(3)\n\
             s.sendto(query('{name}', 4103, pad=2900), ('{v4}', 53))\n\
             print(len(s.recv(65535)))\n"
        ),
    );
    run.assert_success();
    let r = wait_record(&daemon, &world, &name);
    assert_eq!(r.id, 4103, "{r:?}");
    assert_eq!(r.outcome, "answered", "{r:?}");

    // A UDP length field claiming 100 bytes more than the packet has, from a raw socket. The
    // daemon must take the question from the bytes that are there, not from the lie.
    assert_length_lie_dropped(
        &daemon,
        &world,
        &LengthLie {
            qname: format!("lie-{tag}.test.internal."),
            qid: 4104,
            port: 40404,
            socket_py: "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)",
            server: v4.clone(),
            client: format!("{}:40404", world.client_v4),
        },
    );
    // The same lie over IPv6, behind a destination-options header: the drop hook walks the
    // extension header to the UDP header as the socket hooks do.
    assert_length_lie_dropped(
        &daemon,
        &world,
        &LengthLie {
            qname: format!("lie6-{tag}.test.internal."),
            qid: 4105,
            port: 40405,
            socket_py: "s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)\n\
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))",
            server: v6.clone(),
            client: format!("[{}]:40405", world.client_v6),
        },
    );

    let stopped = daemon.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    // Nothing of this was malformed or unreadable to the daemon.
    let summary = stopped
        .stderr
        .lines()
        .rev()
        .find(|l| l.contains("summary:"))
        .unwrap_or_default()
        .to_owned();
    for key in ["malformed=0", "unparseable_packets=0"] {
        assert!(summary.contains(key), "{key} expected: {summary}");
    }
}
