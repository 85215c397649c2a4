#!/usr/bin/env python3
"""Writes the seed corpus of the `pipeline` fuzz target to fuzz/corpus/pipeline/.

Each seed is fuzz input as `dnsprobe::pipeline::fuzz_records` reads it: a sequence of
`[kind u8][len u16 LE][len bytes]`, kind 0 = packet-ring record (`DnsEventOf<N>`, its message
area N the smallest of 128, 256 and 512 bytes that holds the message, as the kernel picks it), 1 = drop-ring
record (`DropEvent`), 2 = timer tick (u64 LE monotonic ns), 3 = prune. The records are laid out
as dnsprobe-common's `#[repr(C)]` structs on x86_64 (little endian).

Real messages (a dig query and its answer, over UDP and TCP) and hostile ones (compression
pointer loops, labels and names over the limits, truncated headers, counts that lie,
zero-length and 64 KiB TCP messages). Run: python3 fuzz/make_seeds.py
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "pipeline")

DNS_CAPTURE_LEN = 512
DNS_CAPTURE_CLASSES = (128, 256, DNS_CAPTURE_LEN)
DNS_EVENT_HEADER_LEN = 96
DROP_CAPTURE_LEN = 128
EGRESS, INGRESS = 0, 1
IPV4, IPV6 = 2, 10
UDP, TCP = 17, 6
PACKET, DROP, TICK, PRUNE = 0, 1, 2, 3

CLIENT = bytes([10, 0, 0, 2]) + bytes(12)
SERVER = bytes([10, 0, 0, 53]) + bytes(12)
CLIENT6 = bytes.fromhex("fd000000000000000000000000000002")
SERVER6 = bytes.fromhex("fd000000000000000000000000000035")
T0 = 1_000_000_000


def dns_event(msg, *, ts=T0, cookie=7, cgroup=1234, pid=4242, tid=4243, direction=EGRESS,
              family=IPV4, proto=UDP, sport=40000, dport=53, comm=b"dig", msg_len=None,
              cap_len=None, saddr=None, daddr=None, area=None):
    if direction == INGRESS:
        saddr = saddr or (SERVER6 if family == IPV6 else SERVER)
        daddr = daddr or (CLIENT6 if family == IPV6 else CLIENT)
        pid_tgid = 0
        comm = b""
    else:
        saddr = saddr or (CLIENT6 if family == IPV6 else CLIENT)
        daddr = daddr or (SERVER6 if family == IPV6 else SERVER)
        pid_tgid = (pid << 32) | tid
    if msg_len is None:
        msg_len = len(msg)
    if area is None:
        area = next((c for c in DNS_CAPTURE_CLASSES if msg_len <= c), DNS_CAPTURE_LEN)
    captured = msg[:area]
    if cap_len is None:
        cap_len = len(captured)
    head = struct.pack("<QQQQ16s16sHHBBBBII16s", ts, cookie, cgroup, pid_tgid, saddr, daddr,
                       sport, dport, family, direction, proto, 0, msg_len, cap_len,
                       comm[:16].ljust(16, b"\0"))
    assert len(head) == DNS_EVENT_HEADER_LEN
    return head + captured.ljust(area, b"\0")


def drop_event(payload, *, ts=T0, location=0xFFFFFFFF81000010, netns=4026531840, reason=3,
               saddr=CLIENT, daddr=SERVER, sport=40000, dport=53, family=IPV4, proto=UDP,
               payload_len=None):
    captured = payload[:DROP_CAPTURE_LEN]
    if payload_len is None:
        payload_len = len(payload)
    head = struct.pack("<QQII16s16sHHBB2sII", ts, location, netns, reason, saddr, daddr, sport,
                       dport, family, proto, b"\0\0", payload_len, len(captured))
    event = head + captured.ljust(DROP_CAPTURE_LEN, b"\0")
    assert len(event) == 200
    return event


def frame(kind, data):
    assert len(data) <= 0xFFFF
    return bytes([kind]) + struct.pack("<H", len(data)) + data


def tick(now):
    return frame(TICK, struct.pack("<Q", now))


def name(*labels):
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\0"


def header(id_, flags, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def question(qname=None, qtype=1):
    return (qname or name(b"example", b"com")) + struct.pack(">HH", qtype, 1)


# What `dig example.com` sends (with an EDNS OPT record) and what comes back.
QUERY = header(0x1234, 0x0120, ar=1) + question() + b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)
RESPONSE = (header(0x1234, 0x8180, an=2, ar=1) + question()
            + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + bytes([93, 184, 215, 14])
            + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + bytes([93, 184, 215, 15])
            + b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0))
NXDOMAIN = header(0x1234, 0x8183) + question()
AAAA_QUERY = header(0x4321, 0x0100) + question(qtype=28)
AAAA_RESPONSE = (header(0x4321, 0x8180, an=1) + question(qtype=28) + b"\xc0\x0c"
                 + struct.pack(">HHIH", 28, 1, 60, 16) + bytes(15) + b"\1")


def tcp(msg, length=None):
    return struct.pack(">H", len(msg) if length is None else length) + msg


def exchange(query, response, ts=T0, **kw):
    rest = {k: v for k, v in kw.items() if k != "sport"}
    return (frame(PACKET, dns_event(query, ts=ts, **kw))
            + frame(PACKET, dns_event(response, ts=ts + 3_000_000, direction=INGRESS,
                                      sport=53, dport=kw.get("sport", 40000), **rest)))


def hostile_query(msg, **kw):
    """A hostile message sent as a query and echoed as a response, then time passes."""
    return (frame(PACKET, dns_event(msg, **kw))
            + frame(PACKET, dns_event(msg, ts=T0 + 1000, direction=INGRESS, sport=53,
                                      dport=40000, **kw))
            + tick(T0 + 20_000_000_000))


seeds = {}
seeds["udp_exchange"] = exchange(QUERY, RESPONSE) + tick(T0 + 2_000_000_000)
seeds["udp_nxdomain"] = exchange(QUERY, NXDOMAIN) + tick(T0 + 2_000_000_000)
seeds["udp6_aaaa"] = exchange(AAAA_QUERY, AAAA_RESPONSE, family=IPV6)
seeds["tcp_exchange"] = exchange(tcp(QUERY), tcp(RESPONSE), proto=TCP)
seeds["udp_resent_unanswered"] = (frame(PACKET, dns_event(QUERY))
                                  + frame(PACKET, dns_event(QUERY, ts=T0 + 1_000_000_000))
                                  + tick(T0 + 5_000_000_000) + tick(T0 + 30_000_000_000))
seeds["lookup_search_list"] = (
    exchange(header(1, 0x0100) + question(name(b"db", b"svc", b"cluster", b"local")),
             header(1, 0x8183) + question(name(b"db", b"svc", b"cluster", b"local")))
    + exchange(header(2, 0x0100) + question(name(b"db")), header(2, 0x8180) + question(name(b"db")),
               ts=T0 + 10_000_000, sport=40001)
    + tick(T0 + 1_000_000_000) + frame(PRUNE, b""))
seeds["drop_query"] = (frame(PACKET, dns_event(QUERY))
                       + frame(DROP, drop_event(QUERY, ts=T0 + 100))
                       + tick(T0 + 300_000_000) + tick(T0 + 20_000_000_000))
seeds["drop_response_tcp"] = (frame(DROP, drop_event(tcp(RESPONSE), sport=53, dport=40000,
                                                     saddr=SERVER, daddr=CLIENT, proto=TCP,
                                                     reason=7))
                              + tick(T0 + 1_000_000_000))
seeds["drop_ipv6_truncated"] = frame(DROP, drop_event(QUERY, family=IPV6, saddr=CLIENT6,
                                                      daddr=SERVER6, payload_len=4000))
seeds["late_response"] = (frame(PACKET, dns_event(QUERY)) + tick(T0 + 20_000_000_000)
                          + frame(PACKET, dns_event(RESPONSE, ts=T0 + 21_000_000_000,
                                                    direction=INGRESS, sport=53, dport=40000)))

# Hostile messages.
loop_self = header(9, 0x0100) + b"\xc0\x0c" + struct.pack(">HH", 1, 1)
loop_pair = header(9, 0x8180, an=1) + question() + b"\xc0\x1f" + b"\xc0\x1d" + bytes(10)
seeds["ptr_loop_question"] = hostile_query(loop_self)
seeds["ptr_loop_answer"] = hostile_query(loop_pair)
seeds["ptr_forward"] = hostile_query(header(9, 0x0100) + b"\xc0\xff" + struct.pack(">HH", 1, 1))
seeds["label_64"] = hostile_query(header(9, 0x0100) + question(name(b"a" * 64, b"com")))
seeds["name_over_255"] = hostile_query(header(9, 0x0100)
                                       + question(name(*[b"b" * 63] * 4, b"c" * 10)))
seeds["name_many_labels"] = hostile_query(header(9, 0x0100) + question(name(*[b"x"] * 127)))
seeds["label_reserved_bits"] = hostile_query(header(9, 0x0100) + b"\x80abc\0" + bytes(4))
seeds["header_truncated"] = hostile_query(header(9, 0x0100)[:7])
seeds["header_only"] = hostile_query(header(9, 0x0100, qd=0))
seeds["counts_lie"] = hostile_query(header(9, 0x8180, qd=65535, an=65535, ns=65535, ar=65535)
                                    + question())
seeds["zero_questions_response"] = hostile_query(header(9, 0x8180, qd=0, an=1)
                                                 + b"\0" + struct.pack(">HHIH", 1, 1, 1, 4)
                                                 + bytes(4))
seeds["rdlength_lies"] = hostile_query(header(9, 0x8180, an=1) + question() + b"\xc0\x0c"
                                       + struct.pack(">HHIH", 1, 1, 300, 0xFFFF) + bytes(4))
seeds["udp_truncated_capture"] = exchange(QUERY, RESPONSE[:40], proto=UDP)
seeds["udp_msg_len_larger"] = frame(PACKET, dns_event(RESPONSE[:30], direction=INGRESS,
                                                      msg_len=4096, sport=53, dport=40000))
seeds["cap_len_over_buffer"] = frame(PACKET, dns_event(QUERY, cap_len=4096))
seeds["zero_length_udp"] = frame(PACKET, dns_event(b"", msg_len=0))
seeds["tcp_zero_length"] = frame(PACKET, dns_event(tcp(b""), proto=TCP))
seeds["tcp_short_prefix"] = frame(PACKET, dns_event(b"\x00", proto=TCP))
seeds["tcp_64k"] = hostile_query(tcp(QUERY, length=0xFFFF) + bytes(600), proto=TCP,
                                 msg_len=0xFFFF + 2)
seeds["tcp_64k_response"] = (frame(PACKET, dns_event(tcp(QUERY), proto=TCP))
                             + frame(PACKET, dns_event(tcp(RESPONSE, length=0xFFFF)
                                                       + bytes(1000), proto=TCP,
                                                       direction=INGRESS, sport=53,
                                                       dport=40000, msg_len=0xFFFF + 2)))
seeds["bad_direction_family_proto"] = (frame(PACKET, dns_event(QUERY, direction=7))
                                       + frame(PACKET, dns_event(QUERY, family=99))
                                       + frame(PACKET, dns_event(QUERY, proto=1)))
seeds["short_records"] = (frame(PACKET, dns_event(QUERY)[:100])
                          + frame(PACKET, dns_event(QUERY)[:DNS_EVENT_HEADER_LEN - 1])
                          # A cap_len beyond the record's message area.
                          + frame(PACKET, dns_event(RESPONSE, direction=INGRESS, area=128,
                                                    cap_len=256))
                          + frame(DROP, b"\x01" * 50)
                          + frame(PACKET, b"") + frame(DROP, b""))
seeds["ticks_backwards"] = (exchange(QUERY, RESPONSE) + tick(2**64 - 1) + tick(0)
                            + frame(PACKET, dns_event(QUERY, ts=2**64 - 1)) + tick(5))
seeds["same_id_many_sockets"] = b"".join(
    frame(PACKET, dns_event(QUERY, cookie=i, sport=40000 + i, pid=i + 1)) for i in range(64)
) + tick(T0 + 20_000_000_000)

os.makedirs(OUT, exist_ok=True)
for old in os.listdir(OUT):
    # `regress-*` are inputs fuzzing found, kept as they were found.
    if not old.startswith("regress-"):
        os.remove(os.path.join(OUT, old))
for label, data in sorted(seeds.items()):
    with open(os.path.join(OUT, label), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {OUT}")
