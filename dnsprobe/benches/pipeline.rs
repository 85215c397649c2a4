//! Userspace cost per query, without the kernel: synthetic ring-buffer records of
//! dnsperf-like traffic (a few sockets asking a few names over and over) and of resolver-like
//! traffic (many processes, each asking A and AAAA of its own name once) fed through the
//! offline pipeline with JSON output to a sink. The baseline, measured in the same run, is
//! reading and decoding the same records only. `cargo bench -p dnsprobe --bench pipeline`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use dnsprobe::{
    coarse,
    decode::{decode_event, read_event},
    pipeline::Pipeline,
};
use dnsprobe_common::{DnsEvent, DIR_EGRESS, DIR_INGRESS, FAMILY_IPV4, PROTO_UDP};
use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{rdata::A, Name, RData, Record, RecordType},
};

/// Counts heap allocations, so the report can say how many a query costs: each is a
/// malloc and a free on the daemon's hot path, and their number does not vary between runs.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Heap bytes allocated and not yet freed, as requested (the allocator's own overhead per
/// block is not included).
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn message(id: u16, name: &str, qtype: RecordType, response: bool) -> Vec<u8> {
    let name = Name::from_ascii(name).expect("valid name");
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(name.clone(), qtype));
    if response {
        m.metadata.message_type = MessageType::Response;
        if qtype == RecordType::A {
            m.add_answer(Record::from_rdata(name, 300, RData::A(A::new(10, 0, 0, 1))));
        }
    }
    m.to_vec().expect("encodable")
}

#[expect(
    clippy::too_many_arguments,
    reason = "a record is made of all of these"
)]
fn record(
    ts_ns: u64,
    cookie: u64,
    pid: u32,
    cgroup_id: u64,
    client_port: u16,
    direction: u8,
    msg: &[u8],
    out: &mut Vec<Vec<u8>>,
) {
    // SAFETY: DnsEvent is plain old data; all zeroes is a valid value.
    let mut e: DnsEvent = unsafe { std::mem::zeroed() };
    e.header.ts_ns = ts_ns;
    e.header.socket_cookie = cookie;
    e.header.cgroup_id = cgroup_id;
    e.header.family = FAMILY_IPV4;
    e.header.l4_proto = PROTO_UDP;
    e.header.direction = direction;
    let client = [10, 1, 0, 2];
    let server = [10, 1, 0, 1];
    if direction == DIR_EGRESS {
        e.header.pid_tgid = (u64::from(pid) << 32) | u64::from(pid);
        e.header.comm[..6].copy_from_slice(b"client");
        e.header.saddr[..4].copy_from_slice(&client);
        e.header.daddr[..4].copy_from_slice(&server);
        e.header.sport = client_port;
        e.header.dport = 53;
    } else {
        e.header.saddr[..4].copy_from_slice(&server);
        e.header.daddr[..4].copy_from_slice(&client);
        e.header.sport = 53;
        e.header.dport = client_port;
    }
    let n = msg.len().min(e.msg.len());
    e.msg[..n].copy_from_slice(&msg[..n]);
    e.header.msg_len = msg.len() as u32;
    e.header.cap_len = n as u32;
    // SAFETY: reading the bytes of a plain-old-data value.
    let bytes = unsafe {
        std::slice::from_raw_parts((&e as *const DnsEvent).cast::<u8>(), size_of::<DnsEvent>())
    };
    out.push(bytes.to_vec());
}

/// Queries from 4 sockets of one process over 64 names, each answered 200 µs later, at
/// 100,000 queries/s: a name is asked again before its lookup closes, so lookups are few.
fn dnsperf_like(queries: usize) -> Vec<Vec<u8>> {
    dnsperf_at(queries, 10_000)
}

/// The same at 1,000 queries/s: a name is asked again only after its lookup closed, so every
/// query is a lookup of its own and gets a lookup record (what `xtask bench` sees at 1k/s).
fn dnsperf_paced(queries: usize) -> Vec<Vec<u8>> {
    dnsperf_at(queries, 1_000_000)
}

fn dnsperf_at(queries: usize, interval_ns: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(queries * 2);
    for i in 0..queries {
        let ts = 1_000_000_000 + i as u64 * interval_ns;
        let socket = (i % 4) as u64;
        let id = (i / 4) as u16;
        let name = format!("name{}.bench.test.", i % 64);
        let port = 40_000 + socket as u16;
        record(
            ts,
            100 + socket,
            4242,
            7,
            port,
            DIR_EGRESS,
            &message(id, &name, RecordType::A, false),
            &mut out,
        );
        record(
            ts + 200_000,
            100 + socket,
            0,
            7,
            port,
            DIR_INGRESS,
            &message(id, &name, RecordType::A, true),
            &mut out,
        );
    }
    out
}

/// Processes asking A and AAAA of one name each, on a socket of their own.
fn resolver_like(queries: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(queries * 2);
    for i in 0..queries / 2 {
        let ts = 1_000_000_000 + i as u64 * 20_000;
        let cookie = 1_000 + i as u64;
        let pid = 10_000 + (i % 30_000) as u32;
        let cgroup = 100 + (i % 50) as u64;
        let port = 1024 + (i % 60_000) as u16;
        let name = format!("svc{}.ns.svc.cluster.local.", i % 500);
        for (k, qtype) in [RecordType::A, RecordType::AAAA].into_iter().enumerate() {
            let id = (i * 2 + k) as u16;
            record(
                ts,
                cookie,
                pid,
                cgroup,
                port,
                DIR_EGRESS,
                &message(id, &name, qtype, false),
                &mut out,
            );
            record(
                ts + 300_000,
                cookie,
                0,
                cgroup,
                port,
                DIR_INGRESS,
                &message(id, &name, qtype, true),
                &mut out,
            );
        }
    }
    out
}

/// Queries that are never answered, each of its own name, from 64 sockets of one process:
/// what the state of an upstream outage is made of.
fn unanswered(queries: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(queries);
    for i in 0..queries {
        let socket = (i % 64) as u64;
        record(
            1_000_000_000 + i as u64 * 50_000,
            100 + socket,
            4242,
            7,
            40_000 + socket as u16,
            DIR_EGRESS,
            &message(
                (i / 64) as u16,
                &format!("q{i}.bench.test."),
                RecordType::A,
                false,
            ),
            &mut out,
        );
    }
    out
}

/// Heap bytes held per pending query once `queries` unanswered queries went through a
/// pipeline capped at `cap` in-flight queries (the daemon's default `--max-inflight`).
fn heap_per_pending_query(missing: &std::path::Path, queries: usize, cap: usize) {
    let records = unanswered(queries);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut pipeline = Pipeline::offline_capped(missing, cap);
    {
        let _clock = coarse::freeze();
        for r in &records {
            pipeline.handle_record(r);
        }
        pipeline.flush();
    }
    // Signed: what was allocated before and freed since counts against it.
    let held = LIVE_BYTES.load(Ordering::Relaxed) as i64 - before as i64;
    let pending = pipeline.tracker.in_flight();
    assert_eq!(pending, cap.min(queries), "the cap did not hold");
    println!(
        "\n{queries} unanswered queries, cap {cap}: {pending} pending, {:.1} MiB of heap, \
         {:.0} bytes per pending query",
        held as f64 / (1024.0 * 1024.0),
        held as f64 / pending as f64
    );
    black_box(pipeline);
}

fn evict_caches(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate().step_by(64) {
        *b = b.wrapping_add(i as u8);
    }
    black_box(buf);
}

/// Time and allocations (including reallocations) per query of `f`.
fn per_query(records: &[Vec<u8>], queries: usize, f: impl FnOnce(&[Vec<u8>])) -> (f64, f64) {
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    f(records);
    let ns = start.elapsed().as_nanos() as f64 / queries as f64;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    (ns, allocations as f64 / queries as f64)
}

/// Makes the ring-buffer records of a number of queries.
type MakeRecords = fn(usize) -> Vec<Vec<u8>>;

fn main() {
    let queries: usize = std::env::var("DNSPROBE_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let missing = std::env::temp_dir().join("dnsprobe-bench-missing-dir");
    println!(
        "{:<14} {:>10} {:>12} {:>12} {:>8} {:>14} {:>12} {:>10}",
        "traffic",
        "queries",
        "decode ns/q",
        "full ns/q",
        "ratio",
        "decode allocs/q",
        "full allocs/q",
        "lookups/q"
    );
    // DNSPROBE_BENCH_SHAPE=dnsperf-like (or another shape's name) runs one shape, for `perf record`.
    let only = std::env::var("DNSPROBE_BENCH_SHAPE").ok();
    // DNSPROBE_BENCH_COLD=1 overwrites 64 MiB (or DNSPROBE_BENCH_COLD_MIB) before every tick,
    // untimed: between its wake-ups other programs push the daemon's data and code out of the
    // caches. Set but empty, it is off.
    let mut cold = std::env::var_os("DNSPROBE_BENCH_COLD")
        .filter(|v| !v.is_empty())
        .map(|_| {
            vec![
                0u8;
                std::env::var("DNSPROBE_BENCH_COLD_MIB")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(64usize)
                    << 20
            ]
        });
    // DNSPROBE_BENCH_IDLE_MS=900 sleeps that long before every tick, untimed, as the daemon
    // sleeps between its ticks at low rates: the figures then include coming back to a CPU
    // that was idle (or given to someone else) meanwhile.
    let idle = std::env::var("DNSPROBE_BENCH_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    let shapes: [(&str, MakeRecords); 3] = [
        ("dnsperf-like", dnsperf_like),
        ("dnsperf-paced", dnsperf_paced),
        ("resolver-like", resolver_like),
    ];
    for (name, make) in shapes {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let records = make(queries);
        let (decode, decode_allocs) = per_query(&records, queries, |rs| {
            for r in rs {
                let _ = black_box(read_event(r).and_then(|e| decode_event(&e)));
            }
        });
        let mut pipeline = Pipeline::offline(&missing);
        // Cache eviction and idle sleeps between ticks, taken out of the timed figure.
        let mut untimed = std::time::Duration::ZERO;
        let (full, full_allocs) = per_query(&records, queries, |rs| {
            // The daemon's tick (`--flush-interval`, 1 s by default), in the records' own clock.
            let mut next_tick = 0;
            // The daemon reads the ring in batches of at most 4096 records, each with one clock
            // reading for its caches.
            for batch in rs.chunks(4096) {
                let _clock = coarse::freeze();
                for r in batch {
                    let ts = read_event(r).map(|e| e.header.ts_ns).unwrap_or_default();
                    if ts >= next_tick {
                        if let Some(buf) = cold.as_mut() {
                            let start = Instant::now();
                            evict_caches(buf);
                            untimed += start.elapsed();
                        }
                        if let Some(idle) = idle {
                            let start = Instant::now();
                            std::thread::sleep(idle);
                            untimed += start.elapsed();
                        }
                        pipeline.expire_at(ts);
                        pipeline.flush();
                        next_tick = ts + 1_000_000_000;
                    }
                    pipeline.handle_record(r);
                }
            }
            pipeline.close_all_lookups();
            pipeline.flush();
        });
        let full = full - untimed.as_nanos() as f64 / queries as f64;
        let t = pipeline.tracker.stats();
        assert_eq!(
            t.answered as usize, queries,
            "{name}: not every query was answered"
        );
        println!(
            "{name:<14} {queries:>10} {decode:>12.0} {full:>12.0} {:>8.2} {decode_allocs:>14.1} {full_allocs:>12.1} {:>10.2}",
            full / decode,
            pipeline.lookups.stats().lookups as f64 / queries as f64
        );
    }
    if only.as_deref().is_none_or(|o| o == "unanswered") {
        heap_per_pending_query(&missing, 100_000, 65_536);
    }
}
