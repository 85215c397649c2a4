//! Writes finished queries as JSON lines or readable text.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    correlate::{DropRecord, FinishedQuery, Outcome, Sender},
    decode::{qtype_mnemonic, qtype_name, rcode_mnemonic, rcode_name, Answer},
    lookup::{LateArrival, LookupRecord, ResolverConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing a record: {0}")]
    Write(#[from] io::Error),
    #[error("serialising a record: {0}")]
    Json(#[from] serde_json::Error),
}

/// Converts kernel CLOCK_MONOTONIC nanoseconds to wall-clock nanoseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// realtime - monotonic, sampled once at start.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }
}

/// Current time of `clock` in nanoseconds; the kernel's `bpf_ktime_get_ns` is CLOCK_MONOTONIC.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clock ids used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `2026-11-25T22:41:03.123456789Z`: RFC 3339, UTC, always nine fractional digits.
pub fn rfc3339_nanos(epoch_ns: i128) -> String {
    Timestamp(epoch_ns).to_string()
}

/// A wall-clock time written as [`rfc3339_nanos`] does, without allocating: every record
/// carries one or more, and formatting them was a tenth of the cost of a query.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(pub i128);

impl Timestamp {
    /// Year, month, day, second of the day and nanoseconds.
    fn parts(&self) -> (i64, u32, u32, u32, u32) {
        let secs = self.0.div_euclid(1_000_000_000) as i64;
        let nanos = self.0.rem_euclid(1_000_000_000) as u32;
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        (y, m, d, secs.rem_euclid(86_400) as u32, nanos)
    }

    /// The text of a year in 0..=9999, built on the stack; `None` for any other year.
    fn common(&self) -> Option<[u8; 30]> {
        let (y, m, d, sod, nanos) = self.parts();
        if !(0..=9999).contains(&y) {
            return None;
        }
        let mut b = *b"0000-00-00T00:00:00.000000000Z";
        put_digits(&mut b[0..4], y as u32);
        put_digits(&mut b[5..7], m);
        put_digits(&mut b[8..10], d);
        put_digits(&mut b[11..13], sod / 3600);
        put_digits(&mut b[14..16], (sod / 60) % 60);
        put_digits(&mut b[17..19], sod % 60);
        put_digits(&mut b[20..29], nanos);
        Some(b)
    }
}

/// "00" to "99": two digits per division halves the divisions of a timestamp's nine fraction
/// digits, which every record has one or more of.
static DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// Writes the low decimal digits of `v` into all of `out`, zero-padded.
fn put_digits(out: &mut [u8], mut v: u32) {
    let mut end = out.len();
    while end >= 2 {
        let pair = (v % 100) as usize * 2;
        out[end - 2..end].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        v /= 100;
        end -= 2;
    }
    if end == 1 {
        out[0] = b'0' + (v % 10) as u8;
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.common() {
            // Only ASCII digits and separators were written.
            Some(b) => f.write_str(std::str::from_utf8(&b).map_err(|_| std::fmt::Error)?),
            None => {
                let (y, m, d, sod, nanos) = self.parts();
                write!(
                    f,
                    "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
                    sod / 3600,
                    (sod / 60) % 60,
                    sod % 60
                )
            }
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.common() {
            Some(b) => s.serialize_str(std::str::from_utf8(&b).map_err(serde::ser::Error::custom)?),
            None => s.collect_str(self),
        }
    }
}

/// A socket address serialised as its `Display` text (`10.0.0.1:53`, `[fd00::1]:53`), built
/// on the stack: two or more are in every record, and `Display` through the formatting
/// machinery cost as much as the rest of the record.
pub struct SocketText<'a>(pub &'a SocketAddr);

/// An address as `Display` writes it, built on the stack.
struct AddressText {
    /// At most 64 bytes are written: "[", 45 of IPv6 address, "%" and 10 of scope id,
    /// "]:65535".
    buf: [u8; 80],
    len: usize,
}

impl Default for AddressText {
    fn default() -> Self {
        Self {
            buf: [0; 80],
            len: 0,
        }
    }
}

impl AddressText {
    fn socket(addr: &SocketAddr) -> Result<Self, std::io::Error> {
        match addr {
            SocketAddr::V4(v4) => Ok(Self::v4(*v4.ip(), Some(v4.port()))),
            SocketAddr::V6(_) => Self::displayed(addr),
        }
    }

    fn v4(ip: std::net::Ipv4Addr, port: Option<u16>) -> Self {
        let mut buf = [0u8; 80];
        let mut at = put_ipv4(&mut buf, ip);
        if let Some(port) = port {
            buf[at] = b':';
            at += 1;
            at += put_decimal(&mut buf[at..], u32::from(port));
        }
        Self { buf, len: at }
    }

    /// IPv6 through `Display` itself: rarer, and its zero compression is easy to get wrong.
    fn displayed(value: &impl std::fmt::Display) -> Result<Self, std::io::Error> {
        use std::io::Write as _;
        let mut buf = [0u8; 80];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        write!(cursor, "{value}")?;
        let len = cursor.position() as usize;
        Ok(Self { buf, len })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `text` in quotes; the caller knows it needs no escaping.
fn push_quoted(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

/// `ip` in dotted decimal at the start of `out` (which must hold 15 bytes); returns how many
/// bytes it took.
fn put_ipv4(out: &mut [u8], ip: std::net::Ipv4Addr) -> usize {
    let mut at = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[at] = b'.';
            at += 1;
        }
        let (len, text) = OCTET_TEXT[usize::from(octet)];
        out[at..at + 3].copy_from_slice(&text);
        at += usize::from(len);
    }
    at
}

/// The decimal text of every byte value, and its length: four look-ups write an address.
static OCTET_TEXT: [(u8, [u8; 3]); 256] = {
    let mut table = [(0u8, [0u8; 3]); 256];
    let mut v = 0;
    while v < 256 {
        let digits = [
            b'0' + (v / 100) as u8,
            b'0' + (v / 10 % 10) as u8,
            b'0' + (v % 10) as u8,
        ];
        table[v] = if v >= 100 {
            (3, digits)
        } else if v >= 10 {
            (2, [digits[1], digits[2], 0])
        } else {
            (1, [digits[2], 0, 0])
        };
        v += 1;
    }
    table
};

/// An answer as a JSON string.
fn push_json_answer(out: &mut Vec<u8>, answer: &Answer) -> Result<(), ExportError> {
    match answer {
        // Nearly every answer: written without the room an IPv6 address and port would need.
        Answer::Address(IpAddr::V4(ip)) => {
            let mut buf = *b"\"000.000.000.000\"";
            let len = put_ipv4(&mut buf[1..], *ip);
            buf[len + 1] = b'"';
            out.extend_from_slice(&buf[..len + 2]);
        }
        Answer::Address(IpAddr::V6(ip)) => push_quoted(out, AddressText::displayed(ip)?.as_bytes()),
        Answer::Text(text) => push_json_str(out, text),
    }
    Ok(())
}

impl Serialize for SocketText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = AddressText::socket(self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(std::str::from_utf8(text.as_bytes()).map_err(serde::ser::Error::custom)?)
    }
}

/// The lead of a query record's field after the first, `,"name":`, as one literal: a record
/// is written field by field into a byte buffer rather than through serde (serde_json's
/// generic path, keys escaped at run time and every value through a trait call, cost twice as
/// much), and a lead of known length is copied without a call. The output is the same JSON;
/// `tests::query_record_fields` reads it back.
macro_rules! lead {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

fn push_opt_str(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => push_json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn push_num(out: &mut Vec<u8>, value: impl itoa::Integer) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(value).as_bytes());
}

fn push_opt_num(out: &mut Vec<u8>, value: Option<impl itoa::Integer>) {
    match value {
        Some(v) => push_num(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn push_bool(out: &mut Vec<u8>, value: bool) {
    let text: &[u8] = if value { b"true" } else { b"false" };
    out.extend_from_slice(text);
}

/// A JSON array of `items`, each written by `item`.
fn push_array<T>(
    out: &mut Vec<u8>,
    items: &[T],
    mut item: impl FnMut(&mut Vec<u8>, &T) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    out.push(b'[');
    for (i, value) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, value)?;
    }
    out.push(b']');
    Ok(())
}

/// The text of the IPv4 socket address written last, to write again without formatting it:
/// the server of nearly every query is the same, address and port, and a pod's client sockets
/// share their address.
#[derive(Default)]
struct Ipv4Text {
    ip: Option<std::net::Ipv4Addr>,
    port: Option<u16>,
    /// The address's length in `text`, where its `:port` starts.
    ip_len: usize,
    /// `"address:port"`, quotes included.
    text: AddressText,
}

impl Ipv4Text {
    /// `addr` in quotes, as `Display` writes it.
    fn push_socket(&mut self, out: &mut Vec<u8>, addr: &SocketAddr) -> Result<(), ExportError> {
        match addr {
            SocketAddr::V4(v4) => {
                if self.ip != Some(*v4.ip()) {
                    let buf = &mut self.text.buf;
                    buf[0] = b'"';
                    self.ip_len = 1 + put_ipv4(&mut buf[1..], *v4.ip());
                    self.ip = Some(*v4.ip());
                    self.port = None;
                }
                if self.port != Some(v4.port()) {
                    // At most 1 + 15 + 1 + 5 + 1 of the 80 bytes.
                    let buf = &mut self.text.buf;
                    let mut at = self.ip_len;
                    buf[at] = b':';
                    at += 1;
                    at += put_decimal(&mut buf[at..], u32::from(v4.port()));
                    buf[at] = b'"';
                    self.text.len = at + 1;
                    self.port = Some(v4.port());
                }
                out.extend_from_slice(self.text.as_bytes());
            }
            SocketAddr::V6(_) => push_quoted(out, AddressText::displayed(addr)?.as_bytes()),
        }
        Ok(())
    }
}

/// The JSON of the resolver configuration written last, and that configuration: the
/// processes of a pod share one, which its lookup records repeat.
#[derive(Default)]
struct ResolverText {
    /// Held, so that its address cannot be reused by another configuration while it is
    /// compared by address.
    config: Option<Arc<ResolverConfig>>,
    text: Vec<u8>,
}

impl ResolverText {
    fn push(
        &mut self,
        out: &mut Vec<u8>,
        config: Option<&Arc<ResolverConfig>>,
    ) -> Result<(), ExportError> {
        let Some(config) = config else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        if !self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            self.config = None;
            self.text.clear();
            serde_json::to_writer(&mut self.text, &**config)?;
            self.config = Some(Arc::clone(config));
        }
        out.extend_from_slice(&self.text);
        Ok(())
    }
}

/// The sender's fields of the last query record (`"pid"` to `"host_unit"`) and the sender they
/// were written for: a busy process sends query after query, and its pod and container went
/// through serde for every one.
#[derive(Default)]
struct SenderText {
    sender: Option<Sender>,
    text: Vec<u8>,
}

impl SenderText {
    fn push(&mut self, out: &mut Vec<u8>, s: &Sender) -> Result<(), ExportError> {
        // Everything but the lookup, which the record does not show. Names shared with the
        // last sender compare by address.
        let same = self.sender.as_ref().is_some_and(|last| {
            last.pid == s.pid
                && last.tid == s.tid
                && last.cgroup_id == s.cgroup_id
                && last.names == s.names
        });
        if !same {
            self.sender = None;
            self.text.clear();
            push_sender(&mut self.text, s)?;
            self.sender = Some(s.clone());
        }
        out.extend_from_slice(&self.text);
        Ok(())
    }
}

/// The sender's fields of the last lookup record (`"pid"` to `"container"`) and what they
/// were written from: a process's lookups follow one another, and its pod and container went
/// through serde for every one.
#[derive(Default)]
struct LookupSenderText {
    /// Held, so that their addresses cannot be reused by other names while they are compared
    /// by address.
    sender: Option<LookupSender>,
    text: Vec<u8>,
}

struct LookupSender {
    pid: Option<u32>,
    cgroup_id: u64,
    comm: Option<Arc<str>>,
    cgroup_path: Option<Arc<str>>,
    workload: Option<Arc<crate::attribute::Workload>>,
}

/// Both absent, or both the one allocation.
fn same_arc<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl LookupSenderText {
    fn push(&mut self, out: &mut Vec<u8>, l: &LookupRecord) -> Result<(), ExportError> {
        let same = self.sender.as_ref().is_some_and(|last| {
            last.pid == l.pid
                && last.cgroup_id == l.cgroup_id
                && same_arc(&last.comm, &l.comm)
                && same_arc(&last.cgroup_path, &l.cgroup_path)
                && same_arc(&last.workload, &l.workload)
        });
        if !same {
            self.sender = None;
            self.text.clear();
            let text = &mut self.text;
            text.extend_from_slice(lead!("pid"));
            push_opt_num(text, l.pid);
            text.extend_from_slice(lead!("comm"));
            push_opt_str(text, l.comm.as_deref());
            text.extend_from_slice(lead!("cgroup_id"));
            push_num(text, l.cgroup_id);
            text.extend_from_slice(lead!("cgroup_path"));
            push_opt_str(text, l.cgroup_path.as_deref());
            if let Some(workload) = l.workload.as_deref() {
                push_pod_and_container(text, workload)?;
            }
            self.sender = Some(LookupSender {
                pid: l.pid,
                cgroup_id: l.cgroup_id,
                comm: l.comm.clone(),
                cgroup_path: l.cgroup_path.clone(),
                workload: l.workload.clone(),
            });
        }
        out.extend_from_slice(&self.text);
        Ok(())
    }
}

/// `,"pid":...` to `"host_unit"`, in the field order of the README.
fn push_sender(out: &mut Vec<u8>, sender: &Sender) -> Result<(), ExportError> {
    out.extend_from_slice(lead!("pid"));
    push_opt_num(out, sender.pid);
    out.extend_from_slice(lead!("tid"));
    push_opt_num(out, sender.tid);
    let s = &*sender.names;
    out.extend_from_slice(lead!("comm"));
    push_opt_str(out, s.comm.as_deref());
    out.extend_from_slice(lead!("thread_comm"));
    push_opt_str(out, s.thread_comm.as_deref());
    out.extend_from_slice(lead!("cgroup_id"));
    push_num(out, sender.cgroup_id);
    out.extend_from_slice(lead!("cgroup_path"));
    push_opt_str(out, s.cgroup_path.as_deref());
    if let Some(workload) = s.workload.as_deref() {
        push_pod_and_container(out, workload)?;
        if let Some(unit) = &workload.host_unit {
            out.extend_from_slice(lead!("host_unit"));
            push_json_str(out, unit);
        }
    }
    Ok(())
}

/// `,"pod":{...}` and `,"container":{...}`, each when known: query and lookup records alike.
fn push_pod_and_container(
    out: &mut Vec<u8>,
    workload: &crate::attribute::Workload,
) -> Result<(), ExportError> {
    if let Some(pod) = &workload.pod {
        out.extend_from_slice(lead!("pod"));
        serde_json::to_writer(&mut *out, pod)?;
    }
    if let Some(container) = &workload.container {
        out.extend_from_slice(lead!("container"));
        serde_json::to_writer(&mut *out, container)?;
    }
    Ok(())
}

/// Whether any byte of `bytes` is a control character, `"` or `\\`, tested eight bytes at a
/// time: every string of every record goes through here, and nearly none need escaping.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether a byte of `x` is below `n` (n <= 128): exact as to whether, if not as to which.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let has = |x: u64, b: u8| below(x ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word);
        if below(x, 0x20) || has(x, b'"') || has(x, b'\\') {
            return true;
        }
    }
    // The tail as one more word, padded with a letter: a byte at a time cost as much as the
    // words before it for a name of twenty-odd bytes.
    let rest = chunks.remainder();
    if rest.is_empty() {
        return false;
    }
    let mut word = [b'a'; 8];
    word[..rest.len()].copy_from_slice(rest);
    let x = u64::from_ne_bytes(word);
    below(x, 0x20) || has(x, b'"') || has(x, b'\\')
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let bytes = value.as_bytes();
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
    } else {
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0x00..=0x1f => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0x0f)]);
                }
                _ => out.push(b),
            }
        }
    }
    out.push(b'"');
}

fn push_json_time(out: &mut Vec<u8>, t: Timestamp, seconds: &mut SecondText) {
    match seconds.text(t) {
        Some(text) => push_quoted(out, text),
        None => push_quoted(out, t.to_string().as_bytes()),
    }
}

/// The text of the last whole second written: records come in time order, so nearly every
/// timestamp falls in the second of the one before, and only its nine fraction digits are
/// new. Working out the calendar date was most of a timestamp's cost.
#[derive(Default)]
struct SecondText {
    /// Seconds since the epoch of `text`, when it holds one.
    seconds: Option<i64>,
    text: [u8; 30],
}

impl SecondText {
    /// `t` as `Timestamp::common` writes it.
    fn text(&mut self, t: Timestamp) -> Option<&[u8; 30]> {
        // In 64 bits (any time within 292 years of 1970): 128-bit division is a library call.
        let Ok(ns) = i64::try_from(t.0) else {
            self.text = t.common()?;
            self.seconds = None;
            return Some(&self.text);
        };
        let seconds = ns.div_euclid(1_000_000_000);
        if self.seconds != Some(seconds) {
            self.text = t.common()?;
            self.seconds = Some(seconds);
            return Some(&self.text);
        }
        put_digits(&mut self.text[20..29], ns.rem_euclid(1_000_000_000) as u32);
        Some(&self.text)
    }
}

/// Writes `v` in decimal at the start of `out` (which must hold 10 bytes) and returns how many
/// bytes it took.
fn put_decimal(out: &mut [u8], v: u32) -> usize {
    let digits = v.checked_ilog10().unwrap_or(0) as usize + 1;
    put_digits(&mut out[..digits], v);
    digits
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Serialize)]
struct DropJson<'a> {
    time: Timestamp,
    packet: &'static str,
    reason: &'a str,
    kind: &'a str,
    detail: Option<&'a str>,
    location: &'a str,
    netns: u32,
    src: SocketText<'a>,
    dst: SocketText<'a>,
    dns_id: Option<u16>,
}

impl<'a> DropJson<'a> {
    fn new(d: &'a DropRecord, clock: &WallClock) -> Self {
        Self {
            time: Timestamp(clock.wall_ns(d.ts_ns)),
            packet: d.packet.as_str(),
            reason: &d.reason,
            kind: &d.kind,
            detail: d.detail.as_deref(),
            location: &d.location,
            netns: d.netns_inum,
            src: SocketText(&d.src),
            dst: SocketText(&d.dst),
            dns_id: d.dns_id,
        }
    }
}

/// A drop that matched no pending query (its query already ended, or was never seen).
#[derive(Serialize)]
struct DropEventRecord<'a> {
    event: &'static str,
    #[serde(flatten)]
    drop: DropJson<'a>,
}

#[derive(Serialize)]
struct LateJson<'a> {
    event: &'static str,
    time: Timestamp,
    qname: &'a str,
    qtype: String,
    id: u16,
    why: &'a str,
    after_first_send_ns: u64,
    pid: Option<u32>,
    cgroup_id: u64,
}

/// Bytes of records gathered before they are written out (besides every flush).
const OUTPUT_BATCH: usize = 64 * 1024;

pub enum RecordFormat {
    Json,
    Text,
}

pub struct RecordWriter<W: Write> {
    out: W,
    /// Whole records not yet written to `out`, each ending in a newline: written when
    /// [`OUTPUT_BATCH`] bytes have gathered and at every flush. Records are serialised here
    /// directly: a line buffer copied into a `BufWriter` copied every record twice.
    pending: Vec<u8>,
    seconds: SecondText,
    client_ip: Ipv4Text,
    server_ip: Ipv4Text,
    sender_text: SenderText,
    lookup_sender_text: LookupSenderText,
    resolver_text: ResolverText,
    format: RecordFormat,
    clock: WallClock,
    written: u64,
    errors: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W, format: RecordFormat, clock: WallClock) -> Self {
        Self {
            out,
            pending: Vec::with_capacity(OUTPUT_BATCH + 4096),
            seconds: SecondText::default(),
            client_ip: Ipv4Text::default(),
            server_ip: Ipv4Text::default(),
            sender_text: SenderText::default(),
            lookup_sender_text: LookupSenderText::default(),
            resolver_text: ResolverText::default(),
            format,
            clock,
            written: 0,
            errors: 0,
        }
    }

    /// Counts a failed write and says so on stderr, without flooding it when the output is
    /// gone for good (a closed pipe fails every record).
    pub fn note(&mut self, result: Result<(), ExportError>) {
        if let Err(err) = result {
            self.errors += 1;
            if self.errors.is_power_of_two() {
                tracing::warn!("{err} ({} failed writes so far)", self.errors);
            }
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write_query(&mut self, q: &FinishedQuery) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let start = self.pending.len();
                if let Err(err) = self.query_json(q) {
                    self.pending.truncate(start);
                    return Err(err);
                }
                self.pending.push(b'\n');
            }
            RecordFormat::Text => {
                let line = text_line(q, &self.clock);
                self.pending.extend_from_slice(line.as_bytes());
            }
        }
        self.written += 1;
        self.write_if_full()
    }

    /// A query record onto `self.pending`, in the field order of the README.
    fn query_json(&mut self, q: &FinishedQuery) -> Result<(), ExportError> {
        let clock = self.clock;
        let seconds = &mut self.seconds;
        let out = &mut self.pending;
        out.extend_from_slice(b"{\"event\":\"query\",\"time\":");
        let time = out.len();
        push_json_time(out, Timestamp(clock.wall_ns(q.first_send_ns())), seconds);
        let time = time..out.len();
        out.extend_from_slice(lead!("qname"));
        push_json_str(out, &q.qname);
        out.extend_from_slice(lead!("qtype"));
        // Mnemonics and `TYPEnnn` need no escaping.
        push_quoted(out, qtype_mnemonic(q.qtype).as_bytes());
        out.extend_from_slice(lead!("id"));
        push_num(out, q.id);
        out.extend_from_slice(lead!("transport"));
        push_quoted(out, q.transport.as_str().as_bytes());
        out.extend_from_slice(lead!("client"));
        self.client_ip.push_socket(out, &q.client)?;
        out.extend_from_slice(lead!("server"));
        self.server_ip.push_socket(out, &q.server)?;
        out.extend_from_slice(lead!("outcome"));
        push_quoted(out, q.outcome.as_str().as_bytes());
        out.extend_from_slice(lead!("rcode"));
        match q.rcode {
            // Mnemonics and `RCODEnnn` need no escaping.
            Some(rcode) => push_quoted(out, rcode_mnemonic(rcode).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(lead!("latency_ns"));
        push_opt_num(out, q.latency_ns());
        out.extend_from_slice(lead!("sends"));
        push_num(out, q.send_ts_ns.len());
        out.extend_from_slice(lead!("send_times"));
        if let [_only] = q.send_ts_ns.as_slice() {
            // Sent once: the time above, already written.
            out.push(b'[');
            out.extend_from_within(time);
            out.push(b']');
        } else {
            push_array(out, &q.send_ts_ns, |out, &t| {
                push_json_time(out, Timestamp(clock.wall_ns(t)), seconds);
                Ok(())
            })?;
        }
        out.extend_from_slice(lead!("answers"));
        push_array(out, &q.answers, push_json_answer)?;
        out.extend_from_slice(lead!("truncated"));
        push_bool(out, q.truncated);
        self.sender_text.push(out, &q.sender)?;
        out.extend_from_slice(lead!("socket_cookie"));
        push_num(out, q.socket_cookie);
        out.extend_from_slice(lead!("drops"));
        if q.drops.is_empty() {
            out.extend_from_slice(b"[]");
        } else {
            let drops: Vec<DropJson<'_>> =
                q.drops.iter().map(|d| DropJson::new(d, &clock)).collect();
            serde_json::to_writer(&mut *out, &drops)?;
        }
        out.push(b'}');
        Ok(())
    }

    /// A lookup record onto `self.pending`, in the field order of the README, the way
    /// [`Self::query_json`] writes a query: at low rates nearly every query is a lookup of its
    /// own, and serde made its record cost three times the query's.
    fn lookup_json(&mut self, l: &LookupRecord) -> Result<(), ExportError> {
        let out = &mut self.pending;
        out.extend_from_slice(b"{\"event\":");
        // The event's name is one of the lookup module's own words, and the code a
        // mnemonic or `RCODEnnn`: neither needs escaping (checked in every test).
        debug_assert!(!needs_escape(l.event.as_bytes()), "{}", l.event);
        push_quoted(out, l.event.as_bytes());
        out.extend_from_slice(lead!("time"));
        push_json_time(
            out,
            Timestamp(self.clock.wall_ns(l.time_ns)),
            &mut self.seconds,
        );
        out.extend_from_slice(lead!("name"));
        push_json_str(out, &l.name);
        out.extend_from_slice(lead!("duration_ns"));
        push_num(out, l.duration_ns);
        out.extend_from_slice(lead!("queries"));
        push_num(out, l.queries);
        out.extend_from_slice(lead!("search_expansions"));
        push_num(out, l.search_expansions);
        out.extend_from_slice(lead!("final_rcode"));
        match l.final_rcode.as_deref() {
            Some(rcode) => {
                debug_assert!(!needs_escape(rcode.as_bytes()), "{rcode}");
                push_quoted(out, rcode.as_bytes());
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(lead!("answers"));
        push_array(out, &l.answers, push_json_answer)?;
        self.lookup_sender_text.push(out, l)?;
        out.extend_from_slice(lead!("resolver"));
        self.resolver_text.push(out, l.resolver.as_ref())?;
        out.extend_from_slice(lead!("diagnosis"));
        if l.diagnosis.is_empty() {
            out.extend_from_slice(b"[]");
        } else {
            serde_json::to_writer(&mut *out, &l.diagnosis)?;
        }
        out.push(b'}');
        Ok(())
    }

    /// One JSON record and its newline; nothing of it when it cannot be serialised.
    fn json_line(&mut self, record: &impl Serialize) -> Result<(), ExportError> {
        let start = self.pending.len();
        if let Err(err) = serde_json::to_writer(&mut self.pending, record) {
            self.pending.truncate(start);
            return Err(err.into());
        }
        self.pending.push(b'\n');
        Ok(())
    }

    /// Writes the pending records out once a batch has gathered.
    fn write_if_full(&mut self) -> Result<(), ExportError> {
        if self.pending.len() >= OUTPUT_BATCH {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Writes the pending records out. They are dropped when the write fails, so that an
    /// output gone for good (a closed pipe) cannot grow the buffer: the failure is counted.
    fn write_pending(&mut self) -> Result<(), ExportError> {
        let result = self.out.write_all(&self.pending);
        self.pending.clear();
        result?;
        Ok(())
    }

    pub fn write_drop(&mut self, d: &DropRecord) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = DropEventRecord {
                    event: "drop",
                    drop: DropJson::new(d, &self.clock),
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let line = format!(
                    "{} DROP     {:>10} {} {} -> {} {}{} at {} netns {}\n",
                    time_of_day(&self.clock, d.ts_ns),
                    d.packet.as_str(),
                    d.reason,
                    d.src,
                    d.dst,
                    d.kind,
                    d.detail
                        .as_deref()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default(),
                    d.location,
                    d.netns_inum,
                );
                self.pending.extend_from_slice(line.as_bytes());
            }
        }
        self.written += 1;
        self.write_if_full()
    }

    pub fn write_lookup(&mut self, l: &LookupRecord) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let start = self.pending.len();
                if let Err(err) = self.lookup_json(l) {
                    self.pending.truncate(start);
                    return Err(err);
                }
                self.pending.push(b'\n');
            }
            RecordFormat::Text => {
                let who = who(l.comm.as_deref(), l.pid);
                let mut line = format!(
                    "{} LOOKUP {:<8} {:>10} {} queries={} expansions={} {who} {}\n",
                    time_of_day(&self.clock, l.time_ns),
                    l.final_rcode.as_deref().unwrap_or("NO-REPLY"),
                    format_latency(l.duration_ns),
                    l.name,
                    l.queries,
                    l.search_expansions,
                    l.cgroup_path.as_deref().unwrap_or("?"),
                );
                for d in &l.diagnosis {
                    line.push_str(&format!("    {}: {}\n", d.code, d.message));
                }
                self.pending.extend_from_slice(line.as_bytes());
            }
        }
        self.written += 1;
        self.write_if_full()
    }

    pub fn write_late(&mut self, l: &LateArrival) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = LateJson {
                    event: "late_response",
                    time: Timestamp(self.clock.wall_ns(l.ts_ns)),
                    qname: &l.qname,
                    qtype: qtype_name(l.qtype),
                    id: l.id,
                    why: &l.why,
                    after_first_send_ns: l.after_first_send_ns,
                    pid: l.pid,
                    cgroup_id: l.cgroup_id,
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let line = format!(
                    "{} LATE     {:>10} {:<5} {} id={} ({})\n",
                    time_of_day(&self.clock, l.ts_ns),
                    format_latency(l.after_first_send_ns),
                    qtype_name(l.qtype),
                    l.qname,
                    l.id,
                    l.why
                );
                self.pending.extend_from_slice(line.as_bytes());
            }
        }
        self.written += 1;
        self.write_if_full()
    }

    pub fn flush(&mut self) -> Result<(), ExportError> {
        self.write_pending()?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
impl RecordWriter<Vec<u8>> {
    /// Everything written so far, pending records included.
    fn take_text(&mut self) -> String {
        self.flush().expect("writing to a Vec");
        String::from_utf8(std::mem::take(&mut self.out)).expect("records are UTF-8")
    }
}

impl<W: Write> Drop for RecordWriter<W> {
    /// Records still pending are written on the way out, as a `BufWriter` would; a failure
    /// here has nobody left to tell.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Time of day to the microsecond (UTC): what a reader scans for during an incident.
fn time_of_day(clock: &WallClock, mono_ns: u64) -> String {
    let time = rfc3339_nanos(clock.wall_ns(mono_ns));
    time.get(11..26).unwrap_or(&time).to_owned()
}

/// `comm[pid]`, as far as known.
fn who(comm: Option<&str>, pid: Option<u32>) -> String {
    match (comm, pid) {
        (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
        (None, Some(pid)) => format!("[{pid}]"),
        _ => "-".to_owned(),
    }
}

fn text_line(q: &FinishedQuery, clock: &WallClock) -> String {
    let time_of_day = time_of_day(clock, q.first_send_ns());
    let who = who(q.sender.names.comm.as_deref(), q.sender.pid);
    let cgroup = q.sender.names.cgroup_path.as_deref().unwrap_or("?");
    let result = match q.outcome {
        Outcome::Answered => format!(
            "{:<8} {:>10}",
            q.rcode.map(rcode_name).unwrap_or_default(),
            format_latency(q.latency_ns().unwrap_or_default())
        ),
        Outcome::Unanswered => format!("{:<8} {:>10}", "NO-REPLY", "-"),
        Outcome::Dropped => format!("{:<8} {:>10}", "DROPPED", "-"),
    };
    let tcp = if q.transport == crate::decode::Transport::Tcp {
        " tcp"
    } else {
        ""
    };
    let resent = if q.send_ts_ns.len() > 1 {
        format!(" sends={}", q.send_ts_ns.len())
    } else {
        String::new()
    };
    let drops: String = q
        .drops
        .iter()
        .map(|d| format!(" drop={}:{}", d.packet.as_str(), d.kind))
        .collect();
    let answers = if q.answers.is_empty() {
        String::new()
    } else {
        let texts: Vec<String> = q.answers.iter().map(Answer::to_string).collect();
        format!(" [{}]", texts.join(", "))
    };
    format!(
        "{time_of_day} {result} {:<5} {} {} -> {} {who} {cgroup}{tcp}{resent}{drops}{answers}\n",
        qtype_name(q.qtype),
        q.qname,
        q.client,
        q.server,
    )
}

fn format_latency(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.3}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.3}ms", ns as f64 / 1e6)
    } else {
        format!("{:.1}µs", ns as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribute::{ContainerIdentity, PodIdentity},
        lookup::Diagnosis,
    };
    use crate::{correlate::Sender, decode::Transport};

    /// The lookup record as serde writes it: the reference the hand-written one is checked against.
    #[derive(Serialize)]
    struct LookupJson<'a> {
        event: &'static str,
        time: Timestamp,
        name: &'a str,
        duration_ns: u64,
        queries: usize,
        search_expansions: usize,
        final_rcode: Option<&'a str>,
        answers: &'a [Answer],
        pid: Option<u32>,
        comm: Option<&'a str>,
        cgroup_id: u64,
        cgroup_path: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pod: Option<&'a PodIdentity>,
        #[serde(skip_serializing_if = "Option::is_none")]
        container: Option<&'a ContainerIdentity>,
        resolver: Option<&'a ResolverConfig>,
        diagnosis: &'a [Diagnosis],
    }

    /// The stack-built texts read exactly as `Display` writes them.
    #[test]
    fn socket_and_time_texts_match_display() {
        for addr in [
            "0.0.0.0:0",
            "10.1.0.2:53",
            "255.255.255.255:65535",
            "1.22.103.9:4000",
            "[fd00::1]:40000",
            "[::ffff:255.255.255.255]:65535",
            "[fe80::1:2:3:4%4294967295]:65535",
        ] {
            let parsed: SocketAddr = addr.parse().unwrap();
            let json = serde_json::to_string(&SocketText(&parsed)).unwrap();
            assert_eq!(json, format!("\"{parsed}\""), "{addr}");
        }
        // Through the cache of the last socket: same address and port, another port, another
        // address (longer and shorter), another family and back.
        let mut last = Ipv4Text::default();
        for addr in [
            "10.1.0.2:53",
            "10.1.0.2:53",
            "10.1.0.2:40000",
            "10.1.0.2:5",
            "255.255.255.255:65535",
            "1.2.3.4:65535",
            "1.2.3.4:0",
            "[fd00::1]:53",
            "1.2.3.4:0",
            "10.1.0.2:53",
        ] {
            let parsed: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            last.push_socket(&mut out, &parsed).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{parsed}\""),
                "{addr}"
            );
        }
        for ns in [
            0i128,
            1_764_115_263_123_456_789,
            -1,
            253_402_300_799_999_999_999,
            253_402_300_800_000_000_000,
            -62_167_219_200_000_000_001,
        ] {
            let t = Timestamp(ns);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{t}\""), "{ns}");
        }
        assert_eq!(
            Timestamp(1_764_115_263_123_456_789).to_string(),
            "2025-11-26T00:01:03.123456789Z"
        );
        // Through the cache of the last second: same second, the next, back again, out of range.
        let mut seconds = SecondText::default();
        for ns in [
            1_764_115_263_123_456_789i128,
            1_764_115_263_000_000_001,
            1_764_115_263_999_999_999,
            1_764_115_264_000_000_000,
            1_764_115_263_500_000_000,
            -1,
            253_402_300_800_000_000_000,
            1_764_115_263_000_000_000,
        ] {
            let t = Timestamp(ns);
            let mut out = Vec::new();
            push_json_time(&mut out, t, &mut seconds);
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{t}\""), "{ns}");
        }
    }

    fn finished(outcome: Outcome) -> FinishedQuery {
        FinishedQuery {
            qname: "www.test.internal.".into(),
            qtype: 28,
            id: 4242,
            transport: Transport::Udp,
            client: "[fd00::1]:40000".parse().unwrap(),
            server: "[fd00::2]:53".parse().unwrap(),
            socket_cookie: 9,
            send_ts_ns: smallvec::smallvec![1_000_000_000, 2_000_000_000],
            response_ts_ns: (outcome == Outcome::Answered).then_some(2_500_000_000),
            outcome,
            rcode: (outcome == Outcome::Answered).then_some(0),
            truncated: false,
            answers: smallvec::smallvec!["fd00::3".into()],
            sender: Sender {
                pid: Some(10),
                tid: Some(11),
                cgroup_id: 77,
                names: std::sync::Arc::new(crate::correlate::SenderNames {
                    comm: Some("dig".into()),
                    thread_comm: Some("isc-net-0000".into()),
                    cgroup_path: Some("/t".into()),
                    workload: None,
                }),
                lookup: 0,
            },
            drops: Vec::new(),
        }
    }

    #[test]
    fn escape_test_agrees_with_a_byte_by_byte_one() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for len in 0..20 {
            for at in 0..len {
                for special in [
                    0x00u8, 0x1f, b'"', b'\\', 0x20, 0x7f, 0x80, 0xff, b'!', b']',
                ] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    cases.push(bytes.clone());
                    // High bytes around it must not hide or fake a hit.
                    if at + 1 < len {
                        bytes[at + 1] = 0xc3;
                    }
                    if at > 0 {
                        bytes[at - 1] = 0x80;
                    }
                    cases.push(bytes);
                }
            }
        }
        for bytes in cases {
            assert_eq!(needs_escape(&bytes), naive(&bytes), "{bytes:?}");
        }
    }

    /// Fails every write, as a closed pipe does.
    struct ClosedPipe {
        writes: usize,
    }

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_gather_into_large_writes_and_a_failed_write_is_counted_not_kept() {
        let clock = WallClock { offset_ns: 0 };
        let q = finished(Outcome::Answered);
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        w.write_query(&q).unwrap();
        assert!(
            w.out.is_empty(),
            "one record is written out with the next batch or flush"
        );
        let mut records = 1;
        while w.out.is_empty() {
            w.write_query(&q).unwrap();
            records += 1;
            assert!(records < 10_000, "a batch never went out");
        }
        assert!(w.out.len() >= OUTPUT_BATCH && w.pending.is_empty());
        w.write_query(&q).unwrap();
        let text = w.take_text();
        assert_eq!(text.lines().count(), records + 1);
        assert!(text.lines().all(|l| l.starts_with("{\"event\":\"query\"")));

        let mut w = RecordWriter::new(ClosedPipe { writes: 0 }, RecordFormat::Json, clock);
        let mut failed = 0;
        for _ in 0..records + 1 {
            let result = w.write_query(&q);
            failed += usize::from(result.is_err());
            w.note(result);
        }
        w.flush().unwrap_err();
        assert_eq!(failed, 1, "one batch went out, and failed");
        assert_eq!(w.errors(), 1);
        assert!(
            w.pending.is_empty(),
            "what failed is not kept to grow without bound"
        );
        assert_eq!(w.out.writes, 2);
    }

    #[test]
    fn consecutive_records_of_different_senders_each_say_their_own() {
        use crate::attribute::{PodIdentity, Workload};
        let clock = WallClock { offset_ns: 0 };
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        let pod = |name: &str| {
            Some(std::sync::Arc::new(Workload {
                pod: Some(PodIdentity {
                    namespace: Some("ns".into()),
                    name: Some(name.into()),
                    uid: format!("uid-{name}"),
                    qos: None,
                }),
                container: None,
                host_unit: None,
            }))
        };
        let a = finished(Outcome::Answered);
        let mut b = a.clone();
        b.sender.tid = Some(12);
        let mut c = b.clone();
        c.sender.names_mut().comm = Some("other".into());
        let mut d = c.clone();
        d.sender.names_mut().workload = pod("web-0");
        let mut e = d.clone();
        e.sender.names_mut().workload = pod("web-1");
        let mut f = e.clone();
        f.client = "10.9.9.9:1234".parse().unwrap();
        f.server = "10.9.9.8:5353".parse().unwrap();
        let mut g = f.clone();
        g.client = "10.9.9.7:1234".parse().unwrap();
        let queries = [&a, &b, &c, &d, &e, &e, &f, &g, &f, &a];
        for q in queries {
            w.write_query(q).unwrap();
        }
        let text = w.take_text();
        for (line, q) in text.lines().zip(queries) {
            let mut alone = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
            alone.write_query(q).unwrap();
            assert_eq!(format!("{line}\n"), alone.take_text());
        }
        let names: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["pod"]["name"].clone())
            .collect();
        assert_eq!(names[4], "web-1");
        assert_eq!(names[3], "web-0");
        assert!(names[9].is_null());
        let clients: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["client"].clone())
            .collect();
        assert_eq!(
            clients[6..9],
            ["10.9.9.9:1234", "10.9.9.7:1234", "10.9.9.9:1234"]
        );
    }

    /// The serde reference of a lookup record.
    fn serde_lookup_line(l: &LookupRecord, clock: WallClock) -> String {
        let record = LookupJson {
            event: l.event,
            time: Timestamp(clock.wall_ns(l.time_ns)),
            name: &l.name,
            duration_ns: l.duration_ns,
            queries: l.queries,
            search_expansions: l.search_expansions,
            final_rcode: l.final_rcode.as_deref(),
            answers: &l.answers,
            pid: l.pid,
            comm: l.comm.as_deref(),
            cgroup_id: l.cgroup_id,
            cgroup_path: l.cgroup_path.as_deref(),
            pod: l.workload.as_deref().and_then(|w| w.pod.as_ref()),
            container: l.workload.as_deref().and_then(|w| w.container.as_ref()),
            resolver: l.resolver.as_deref(),
            diagnosis: &l.diagnosis,
        };
        serde_json::to_string(&record).unwrap() + "\n"
    }

    /// Records written one after another, each the same bytes as serde's: whatever is kept from
    /// the record before (the resolver's text, the second's text) must not leak into the next.
    #[test]
    fn lookup_records_read_as_serde_writes_them() {
        use crate::attribute::Workload;
        let clock = WallClock {
            offset_ns: 1_764_000_000_000_000_000,
        };
        let cluster = Arc::new(ResolverConfig {
            search: vec!["ns.svc.cluster.local.".into(), "svc.cluster.local.".into()],
            ndots: 5,
            timeout_s: 5,
            attempts: 2,
        });
        // Equal in value, another allocation: written again, and the same.
        let cluster_again = Arc::new((*cluster).clone());
        let node = Arc::new(ResolverConfig {
            search: vec![],
            ndots: 1,
            timeout_s: 2,
            attempts: 3,
        });
        let healthy = LookupRecord {
            event: "lookup",
            time_ns: 1_000_000_000,
            name: "api.example.com.".into(),
            duration_ns: 1_234_567,
            queries: 2,
            search_expansions: 0,
            final_rcode: Some("NOERROR".into()),
            answers: smallvec::smallvec![
                Answer::Address("10.0.0.1".parse().unwrap()),
                Answer::Address("255.255.255.255".parse().unwrap()),
                Answer::Address("0.0.0.0".parse().unwrap()),
                Answer::Address("1.22.103.9".parse().unwrap()),
                Answer::Address("fd00::1".parse().unwrap()),
                Answer::Text("we\"ird\\.\u{1}ünï.".into()),
            ],
            pid: Some(4242),
            comm: Some("cu\"rl".into()),
            cgroup_id: 7,
            cgroup_path: Some("/kubepods/pod-1/c1".into()),
            workload: None,
            resolver: Some(Arc::clone(&cluster)),
            diagnosis: vec![],
        };
        let mut failed = healthy.clone();
        failed.time_ns = 1_000_000_123;
        failed.name = "we\"ird\n.name.".into();
        failed.final_rcode = None;
        failed.answers = Default::default();
        failed.pid = None;
        failed.comm = None;
        failed.cgroup_path = None;
        failed.resolver = None;
        failed.diagnosis = vec![Diagnosis {
            code: "no_response",
            message: "1 query got no answer (A x. from 10.1.0.1:53)".into(),
            evidence: serde_json::json!({"queries": [{"id": 1, "sends": 2}]}),
        }];
        let pod = PodIdentity {
            namespace: Some("ns".into()),
            name: Some("web-0".into()),
            uid: "u-1".into(),
            qos: None,
        };
        let container = ContainerIdentity {
            id: "c1".into(),
            name: Some("app".into()),
            runtime: None,
        };
        let mut in_pod = healthy.clone();
        in_pod.workload = Some(Arc::new(Workload {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
            host_unit: None,
        }));
        in_pod.resolver = Some(Arc::clone(&node));
        let mut pod_only = healthy.clone();
        pod_only.workload = Some(Arc::new(Workload {
            pod: Some(pod),
            container: None,
            host_unit: Some("kubelet.service".into()),
        }));
        pod_only.resolver = Some(cluster_again);
        let mut container_only = healthy.clone();
        container_only.workload = Some(Arc::new(Workload {
            pod: None,
            container: Some(container),
            host_unit: None,
        }));
        // Kept sender fields are compared by address and value: another process with the same
        // names, another cgroup, a name that changed.
        let mut other_pid = healthy.clone();
        other_pid.pid = Some(4243);
        let mut other_cgroup = healthy.clone();
        other_cgroup.cgroup_id = 8;
        let mut renamed = healthy.clone();
        renamed.comm = Some("wget".into());
        let records = [
            &healthy,
            &healthy,
            &failed,
            &in_pod,
            &healthy,
            &pod_only,
            &container_only,
            &failed,
            &healthy,
            &other_pid,
            &other_cgroup,
            &renamed,
            &healthy,
        ];
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        let mut expected = String::new();
        for r in records {
            w.write_lookup(r).unwrap();
            expected += &serde_lookup_line(r, clock);
        }
        let written = w.take_text();
        for (i, (got, want)) in written.lines().zip(expected.lines()).enumerate() {
            assert_eq!(got, want, "record {i}");
        }
        assert_eq!(written, expected);
    }

    #[test]
    fn digits_and_addresses_read_as_display_writes_them() {
        let mut out = [0u8; 10];
        for width in 1..=10 {
            for v in [
                0u32,
                1,
                9,
                10,
                42,
                99,
                100,
                305,
                999_999_999,
                123_456_789,
                u32::MAX,
            ] {
                put_digits(&mut out[..width], v);
                let want = format!("{v:010}");
                assert_eq!(
                    &out[..width],
                    &want.as_bytes()[10 - width..],
                    "{v} in {width}"
                );
            }
        }
        for v in 0..=255u8 {
            let ip = std::net::Ipv4Addr::new(v, 255 - v, v / 10, 9);
            let mut answer = Vec::new();
            push_json_answer(&mut answer, &Answer::Address(IpAddr::V4(ip))).unwrap();
            assert_eq!(answer, format!("\"{ip}\"").as_bytes());
        }
        for v in [0u32, 7, 10, 255, 65_535, 1_000_000, u32::MAX] {
            let n = put_decimal(&mut out, v);
            assert_eq!(&out[..n], v.to_string().as_bytes());
        }
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_764_109_263_123_456_789),
            "2025-11-25T22:21:03.123456789Z"
        );
        assert_eq!(
            rfc3339_nanos(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn json_record_has_the_contract_fields() {
        let clock = WallClock { offset_ns: 0 };
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        w.write_query(&finished(Outcome::Answered)).unwrap();
        w.write_query(&finished(Outcome::Unanswered)).unwrap();
        let text = w.take_text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let a = &lines[0];
        assert_eq!(a["event"], "query");
        assert_eq!(a["time"], "1970-01-01T00:00:01.000000000Z");
        assert_eq!(a["qname"], "www.test.internal.");
        assert_eq!(a["qtype"], "AAAA");
        assert_eq!(a["id"], 4242);
        assert_eq!(a["transport"], "udp");
        assert_eq!(a["client"], "[fd00::1]:40000");
        assert_eq!(a["server"], "[fd00::2]:53");
        assert_eq!(a["outcome"], "answered");
        assert_eq!(a["rcode"], "NOERROR");
        assert_eq!(a["latency_ns"], 1_500_000_000u64);
        assert_eq!(a["sends"], 2);
        assert_eq!(a["answers"], serde_json::json!(["fd00::3"]));
        assert_eq!(a["pid"], 10);
        assert_eq!(a["comm"], "dig");
        assert_eq!(a["cgroup_id"], 77);
        assert_eq!(a["cgroup_path"], "/t");
        let u = &lines[1];
        assert_eq!(u["outcome"], "unanswered");
        assert!(u["rcode"].is_null());
        assert!(u["latency_ns"].is_null());
    }

    /// The hand-written query record, read back as JSON: every field, in the README's order,
    /// with strings that need escaping, a pod, a container and a drop.
    #[test]
    fn query_record_fields() {
        use crate::attribute::{ContainerIdentity, PodIdentity, Workload};
        let clock = WallClock { offset_ns: 0 };
        let mut q = finished(Outcome::Dropped);
        q.qname = "we\"ird\\na\u{1}me\n\t.ünï.".into();
        q.client = "10.1.0.2:40000".parse().unwrap();
        q.server = "10.1.0.1:53".parse().unwrap();
        q.sender.names_mut().comm = Some("a\"b".into());
        q.sender.names_mut().thread_comm = None;
        q.sender.pid = None;
        q.sender.names_mut().workload = Some(std::sync::Arc::new(Workload {
            pod: Some(PodIdentity {
                namespace: Some("ns".into()),
                name: Some("web-0".into()),
                uid: "u-1".into(),
                qos: None,
            }),
            container: Some(ContainerIdentity {
                id: "c1".into(),
                name: Some("app".into()),
                runtime: None,
            }),
            host_unit: None,
        }));
        q.drops = vec![DropRecord {
            ts_ns: 1_500_000_000,
            packet: crate::correlate::DroppedPacket::Query,
            reason: "NETFILTER_DROP".into(),
            kind: "conntrack_insert_failed".into(),
            detail: None,
            location: "nf_hook_slow+0x4c".into(),
            netns_inum: 5,
            src: q.client,
            dst: q.server,
            dns_id: Some(4242),
        }];
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        w.write_query(&q).unwrap();
        let text = w.take_text();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected = serde_json::json!({
            "event": "query",
            "time": "1970-01-01T00:00:01.000000000Z",
            "qname": "we\"ird\\na\u{1}me\n\t.ünï.",
            "qtype": "AAAA",
            "id": 4242,
            "transport": "udp",
            "client": "10.1.0.2:40000",
            "server": "10.1.0.1:53",
            "outcome": "dropped",
            "rcode": null,
            "latency_ns": null,
            "sends": 2,
            "send_times": ["1970-01-01T00:00:01.000000000Z", "1970-01-01T00:00:02.000000000Z"],
            "answers": ["fd00::3"],
            "truncated": false,
            "pid": null,
            "tid": 11,
            "comm": "a\"b",
            "thread_comm": null,
            "cgroup_id": 77,
            "cgroup_path": "/t",
            "pod": {"namespace": "ns", "name": "web-0", "uid": "u-1", "qos": null},
            "container": {"id": "c1", "name": "app", "runtime": null},
            "socket_cookie": 9,
            "drops": [{
                "time": "1970-01-01T00:00:01.500000000Z",
                "packet": "query",
                "reason": "NETFILTER_DROP",
                "kind": "conntrack_insert_failed",
                "detail": null,
                "location": "nf_hook_slow+0x4c",
                "netns": 5,
                "src": "10.1.0.2:40000",
                "dst": "10.1.0.1:53",
                "dns_id": 4242,
            }],
        });
        assert_eq!(value, expected);
        // Field order: serde_json's map keeps keys sorted, so check the text itself.
        let keys: Vec<usize> = expected
            .as_object()
            .unwrap()
            .keys()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        let mut order: Vec<(&str, usize)> = expected
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .zip(keys)
            .collect();
        order.sort_by_key(|(_, at)| *at);
        let order: Vec<&str> = order.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            order,
            [
                "event",
                "time",
                "qname",
                "qtype",
                "id",
                "transport",
                "client",
                "server",
                "outcome",
                "rcode",
                "latency_ns",
                "sends",
                "send_times",
                "answers",
                "truncated",
                "pid",
                "tid",
                "comm",
                "thread_comm",
                "cgroup_id",
                "cgroup_path",
                "pod",
                "container",
                "socket_cookie",
                "drops",
            ]
        );
    }

    #[test]
    fn text_line_is_readable() {
        let line = text_line(&finished(Outcome::Answered), &WallClock { offset_ns: 0 });
        assert!(line.contains("NOERROR"), "{line}");
        assert!(line.contains("1.500s"), "{line}");
        assert!(line.contains("AAAA"), "{line}");
        assert!(line.contains("dig[10]"), "{line}");
        assert!(line.contains("sends=2"), "{line}");
        let line = text_line(&finished(Outcome::Unanswered), &WallClock { offset_ns: 0 });
        assert!(line.contains("NO-REPLY"), "{line}");
    }
}
