//! Turns raw ring-buffer records into packets with a parsed DNS message.
//!
//! The kernel copies at most `DNS_CAPTURE_LEN` bytes of each message. A complete copy is parsed
//! with hickory-proto; a copy cut short by that bound (large EDNS answers) is parsed for its
//! header and question only, which is all that matching needs.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::qname::WIRE_NAME_MAX;
use dnsprobe_common::{
    DnsEventHeader, DIR_EGRESS, DIR_INGRESS, DNS_CAPTURE_LEN, DNS_EVENT_HEADER_LEN, FAMILY_IPV4,
    FAMILY_IPV6, PROTO_TCP, PROTO_UDP,
};
use hickory_proto::{
    op::Message,
    rr::{RData, RecordType},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes is shorter than an event")]
    ShortRecord(usize),
    #[error("event has unknown address family {0}")]
    BadFamily(u8),
    #[error("event has unknown transport protocol {0}")]
    BadProtocol(u8),
    #[error("TCP segment does not start with a DNS message (length prefix {0})")]
    NotMessageStart(usize),
    #[error("event has unknown direction {0}")]
    BadDirection(u8),
    #[error("event claims {0} captured bytes")]
    BadCaptureLength(u32),
    #[error("DNS message shorter than its 12-byte header")]
    ShortHeader,
    #[error("DNS message has no question")]
    NoQuestion,
    #[error("DNS question is malformed: {0}")]
    BadQuestion(&'static str),
    #[error("DNS message is malformed: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Leaving a socket: a query a client sent.
    Egress,
    /// Arriving at a socket: a response a client received.
    Ingress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The question of a DNS message, as matching needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// Fully qualified, as on the wire (`www.example.com.`); case preserved for display,
    /// ignored in matching (see `qname`). Shared by everything that keeps the query.
    pub name: crate::qname::QName,
    pub qtype: u16,
}

/// One record of a response's answer section. Addresses, nearly every answer, are kept as
/// addresses and spelled out only when written: formatting each one as it arrived cost more
/// than reading the rest of the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Address(IpAddr),
    /// Any other record's data in presentation form (a CNAME target, TXT strings, ...).
    /// Shared: a query's lookup keeps a copy of its answers.
    Text(std::sync::Arc<str>),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Address(ip) => ip.fmt(f),
            Answer::Text(text) => f.write_str(text),
        }
    }
}

#[cfg(test)]
impl From<&str> for Answer {
    /// An address when the text is one, else the text.
    fn from(text: &str) -> Self {
        match text.parse() {
            Ok(ip) => Answer::Address(ip),
            Err(_) => Answer::Text(text.into()),
        }
    }
}

/// For comparisons with expected text: equal when `text` reads as this answer.
#[cfg(test)]
impl PartialEq<&str> for Answer {
    fn eq(&self, text: &&str) -> bool {
        match self {
            Answer::Address(ip) => text.parse::<IpAddr>().is_ok_and(|t| t == *ip),
            Answer::Text(own) => **own == **text,
        }
    }
}

impl serde::Serialize for Answer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Answer::Address(ip) => s.collect_str(ip),
            Answer::Text(text) => s.serialize_str(text),
        }
    }
}

/// The answers of one response: nearly always one or none, kept inline then.
pub type Answers = smallvec::SmallVec<[Answer; 1]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    pub is_response: bool,
    /// Response code including EDNS extended bits when the OPT record was readable.
    pub rcode: u16,
    /// The TC bit.
    pub truncated: bool,
    pub question: Question,
    /// Answer-section data (`93.184.216.34`, `alias.example.com.`, ...).
    pub answers: Answers,
    /// Only header and question were read: the capture was cut short.
    pub partial: bool,
}

/// One DNS packet seen by the kernel, decoded.
#[derive(Debug, Clone)]
pub struct Packet {
    pub ts_ns: u64,
    pub socket_cookie: u64,
    pub cgroup_id: u64,
    /// Thread group id (the process id) of the sender, for egress packets.
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<Comm>,
    pub direction: Direction,
    pub transport: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub message: DnsMessage,
}

/// A `DnsEventOf` as it lies in a ring-buffer record: its header copied out, its message area
/// borrowed, so that only the bytes the kernel wrote are read.
#[derive(Debug, Clone)]
pub struct EventRecord<'a> {
    pub header: DnsEventHeader,
    /// The event's whole message area (one of `DNS_CAPTURE_CLASSES`, or what a shorter record
    /// has); `header.cap_len` of them are the message.
    pub msg: &'a [u8],
}

/// Reads a `DnsEventOf` of any size out of a ring-buffer record. The record's length gives the
/// size of its message area.
pub fn read_event(bytes: &[u8]) -> Result<EventRecord<'_>, DecodeError> {
    if bytes.len() < DNS_EVENT_HEADER_LEN {
        return Err(DecodeError::ShortRecord(bytes.len()));
    }
    // SAFETY: `bytes` holds at least a header; `DnsEventHeader` is `#[repr(C)]` plain old data
    // (integers and byte arrays), so any bytes are a valid value, and the read is unaligned
    // because ring-buffer records carry no alignment guarantee.
    let header = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsEventHeader>()) };
    let msg = &bytes[DNS_EVENT_HEADER_LEN..bytes.len().min(DNS_EVENT_HEADER_LEN + DNS_CAPTURE_LEN)];
    Ok(EventRecord { header, msg })
}

pub fn decode_event(record: &EventRecord<'_>) -> Result<Packet, DecodeError> {
    let event = &record.header;
    let direction = match event.direction {
        DIR_EGRESS => Direction::Egress,
        DIR_INGRESS => Direction::Ingress,
        other => return Err(DecodeError::BadDirection(other)),
    };
    let (src_ip, dst_ip) = match event.family {
        FAMILY_IPV4 => (ipv4(&event.saddr), ipv4(&event.daddr)),
        FAMILY_IPV6 => (
            IpAddr::V6(Ipv6Addr::from(event.saddr)),
            IpAddr::V6(Ipv6Addr::from(event.daddr)),
        ),
        other => return Err(DecodeError::BadFamily(other)),
    };
    let transport = match event.l4_proto {
        PROTO_TCP => Transport::Tcp,
        PROTO_UDP => Transport::Udp,
        other => return Err(DecodeError::BadProtocol(other)),
    };
    let captured = record
        .msg
        .get(..event.cap_len as usize)
        .ok_or(DecodeError::BadCaptureLength(event.cap_len))?;
    let message = match transport {
        Transport::Udp => decode_message(captured, event.msg_len > event.cap_len)?,
        Transport::Tcp => decode_tcp_segment(captured)?,
    };
    let (pid, tid, comm) = if direction == Direction::Egress && event.pid_tgid != 0 {
        (
            Some((event.pid_tgid >> 32) as u32),
            Some(event.pid_tgid as u32),
            Comm::from_kernel(&event.comm),
        )
    } else {
        (None, None, None)
    };
    Ok(Packet {
        ts_ns: event.ts_ns,
        socket_cookie: event.socket_cookie,
        cgroup_id: event.cgroup_id,
        pid,
        tid,
        comm,
        direction,
        transport,
        src: SocketAddr::new(src_ip, event.sport),
        dst: SocketAddr::new(dst_ip, event.dport),
        message,
    })
}

fn ipv4(addr: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
}

/// The sending thread's name as the kernel gave it, kept inline: every query has one, and most
/// never need it as a string (a thread's next query reuses its attribution).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    /// `None` for an empty name.
    pub fn from_kernel(raw: &[u8; 16]) -> Option<Self> {
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        (len > 0).then_some(Self {
            bytes: *raw,
            len: len as u8,
        })
    }

    /// As text. Bytes that are not UTF-8 are replaced (U+FFFD); only then does this allocate.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes[..usize::from(self.len)])
    }
}

impl From<&str> for Comm {
    /// Cut to the kernel's 16 bytes, as the kernel does.
    fn from(text: &str) -> Self {
        let mut raw = [0u8; 16];
        let len = text.len().min(raw.len());
        raw[..len].copy_from_slice(&text.as_bytes()[..len]);
        Self {
            bytes: raw,
            len: len as u8,
        }
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.text(), f)
    }
}

/// DNS over TCP prefixes each message with its 16-bit length (RFC 1035 4.2.2). Only segments
/// that start a message are decoded; a message spread over segments is read from its first.
pub fn decode_tcp_segment(segment: &[u8]) -> Result<DnsMessage, DecodeError> {
    let Some((prefix, rest)) = segment.split_first_chunk::<2>() else {
        return Err(DecodeError::ShortHeader);
    };
    let len = usize::from(u16::from_be_bytes(*prefix));
    if len < 12 {
        return Err(DecodeError::NotMessageStart(len));
    }
    let cut_short = rest.len() < len;
    decode_message(&rest[..len.min(rest.len())], cut_short)
}

/// Parses a DNS message. `cut_short` says the bytes are a prefix of a longer message.
///
/// Header and question, all that matching needs, are read here for every message; a query
/// needs nothing more. Only responses go through hickory-proto, for their answers and their
/// EDNS-extended response code: it costs several times more than the question alone, and
/// queries are half the traffic.
pub fn decode_message(bytes: &[u8], cut_short: bool) -> Result<DnsMessage, DecodeError> {
    let (mut message, question_end) = header_and_question(bytes)?;
    let records_at = records_after(bytes, question_end);
    if !message.is_response {
        if !cut_short {
            check_framing(bytes, records_at)?;
        }
        message.partial = cut_short;
        return Ok(message);
    }
    if let Some((rcode, answers)) = read_common_answers(bytes, records_at) {
        message.rcode = rcode;
        message.answers = answers;
        return Ok(message);
    }
    match Message::from_vec(bytes) {
        Ok(msg) => {
            message.rcode = u16::from(msg.metadata.response_code);
            message.answers = msg
                .answers
                .iter()
                .map(|record| match &record.data {
                    RData::A(a) => Answer::Address(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Answer::Address(IpAddr::V6(aaaa.0)),
                    other => Answer::Text(other.to_string().into()),
                })
                .collect();
            Ok(message)
        }
        Err(err) => {
            if cut_short {
                message.partial = true;
                message.answers = salvage_addresses(bytes);
                Ok(message)
            } else {
                Err(DecodeError::Malformed(err.to_string()))
            }
        }
    }
}

/// Where the records of a message (at least 12 bytes) start, when the question whose name ends
/// at `question_end` is its only one: the rest of the message is then walked without reading
/// the question's name again.
fn records_after(bytes: &[u8], question_end: usize) -> Option<usize> {
    (u16::from_be_bytes([bytes[4], bytes[5]]) == 1).then_some(question_end + 4)
}

/// Reads just the header and first question, following compression pointers with a bound.
pub fn parse_header_and_question(bytes: &[u8]) -> Result<DnsMessage, DecodeError> {
    header_and_question(bytes).map(|(message, _)| message)
}

/// [`parse_header_and_question`], and the offset where the question's name ends.
fn header_and_question(bytes: &[u8]) -> Result<(DnsMessage, usize), DecodeError> {
    if bytes.len() < 12 {
        return Err(DecodeError::ShortHeader);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
    let qdcount = u16::from_be_bytes([bytes[4], bytes[5]]);
    if qdcount == 0 {
        return Err(DecodeError::NoQuestion);
    }
    let (name, end) = question_name(bytes)?;
    let qtype_bytes = bytes.get(end..end + 4).ok_or(DecodeError::BadQuestion(
        "question ends before its type and class",
    ))?;
    let message = DnsMessage {
        id,
        is_response: flags & 0x8000 != 0,
        rcode: flags & 0x000f,
        truncated: flags & 0x0200 != 0,
        question: Question {
            name,
            qtype: u16::from_be_bytes([qtype_bytes[0], qtype_bytes[1]]),
        },
        answers: Answers::new(),
        partial: false,
    };
    Ok((message, end))
}

/// One resource record of a message, found by its framing alone.
struct RecordAt<'a> {
    /// In the answer section (the records the header's `ancount` counts first).
    answer: bool,
    rtype: u16,
    /// The record's TTL field, where an OPT record keeps the extended response code.
    ttl_high_byte: u8,
    /// Offset of the record data in the message (names in it may point anywhere before).
    rdata_at: usize,
    rdata: &'a [u8],
}

/// Walks the records after the question section (answer, authority, additional) as the
/// header counts them, reading only their framing. Stops after the first framing error,
/// which it yields.
struct Records<'a> {
    bytes: &'a [u8],
    pos: usize,
    index: usize,
    answers: usize,
    total: usize,
    broken: bool,
}

impl<'a> Records<'a> {
    /// Skips the question section of a message of at least 12 bytes (checked by
    /// `parse_header_and_question` before).
    fn new(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Self::starting(bytes, None)
    }

    /// [`Self::new`], told where the question section ends when the caller knows it already
    /// (`records_at`, within `bytes`).
    fn starting(bytes: &'a [u8], records_at: Option<usize>) -> Result<Self, DecodeError> {
        let count = |at: usize| usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
        let pos = match records_at {
            Some(pos) if pos <= bytes.len() => pos,
            _ => {
                let mut pos = 12;
                for _ in 0..count(4) {
                    pos = skip_name(bytes, pos)? + 4;
                    if pos > bytes.len() {
                        return Err(malformed("question runs past the message"));
                    }
                }
                pos
            }
        };
        Ok(Self {
            bytes,
            pos,
            index: 0,
            answers: count(6),
            total: count(6) + count(8) + count(10),
            broken: false,
        })
    }

    fn read(&mut self) -> Result<RecordAt<'a>, DecodeError> {
        let end = skip_name(self.bytes, self.pos)?;
        let fixed = self
            .bytes
            .get(end..end + 10)
            .ok_or_else(|| malformed("record runs past the message"))?;
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = self
            .bytes
            .get(end + 10..end + 10 + rdlen)
            .ok_or_else(|| malformed("record data runs past the message"))?;
        self.pos = end + 10 + rdlen;
        Ok(RecordAt {
            answer: self.index < self.answers,
            rtype: u16::from_be_bytes([fixed[0], fixed[1]]),
            ttl_high_byte: fixed[4],
            rdata_at: end + 10,
            rdata,
        })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordAt<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.broken || self.index >= self.total {
            return None;
        }
        let record = self.read();
        self.broken = record.is_err();
        self.index += 1;
        Some(record)
    }
}

fn malformed(what: &str) -> DecodeError {
    DecodeError::Malformed(what.to_owned())
}

/// An A or AAAA record's address.
fn address(rtype: u16, rdata: &[u8]) -> Option<Answer> {
    let ip = match rtype {
        1 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).ok()?)),
        28 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).ok()?)),
        _ => return None,
    };
    Some(Answer::Address(ip))
}

/// The response code (with the EDNS extended bits) and answers of a well-framed response whose
/// answers are all A, AAAA or CNAME records: nearly every response a client gets. `None` for
/// anything else, which hickory-proto then reads (or rejects).
fn read_common_answers(bytes: &[u8], records_at: Option<usize>) -> Option<(u16, Answers)> {
    let mut rcode = u16::from(bytes[3] & 0x0f);
    let records = Records::starting(bytes, records_at).ok()?;
    // The header's count is the sender's word: no more records fit than 11-byte ones (a
    // pointer or root name and the fixed fields).
    let mut answers = Answers::with_capacity(records.answers.min(bytes.len() / 11));
    for record in records {
        let record = record.ok()?;
        if record.answer {
            answers.push(match record.rtype {
                5 => {
                    let (target, end) = read_name(bytes, record.rdata_at).ok()?;
                    if end != record.rdata_at + record.rdata.len() {
                        return None;
                    }
                    Answer::Text(target.into())
                }
                rtype => address(rtype, record.rdata)?,
            });
        } else if record.rtype == 41 {
            // OPT: the upper eight bits of the extended response code sit in its TTL field.
            rcode |= u16::from(record.ttl_high_byte) << 4;
        }
    }
    Some((rcode, answers))
}

/// Checks that every section holds as many well-formed records as the header counts, without
/// building any of them: what parsing the message fully would reject, at a fraction of the
/// cost.
fn check_framing(bytes: &[u8], records_at: Option<usize>) -> Result<(), DecodeError> {
    Records::starting(bytes, records_at)?.try_for_each(|record| record.map(|_| ()))
}

/// The offset just past the name at `start` (pointers are not followed: only their two bytes
/// count here).
fn skip_name(bytes: &[u8], start: usize) -> Result<usize, DecodeError> {
    let mut pos = start;
    // 128 labels is the most a 255-byte name can have.
    for _ in 0..128 {
        let len = usize::from(
            *bytes
                .get(pos)
                .ok_or_else(|| malformed("name runs past the message"))?,
        );
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + len,
            0xc0 => return Ok(pos + 2),
            _ => return Err(malformed("reserved label type")),
        }
    }
    Err(malformed("name has too many labels"))
}

/// The A and AAAA answers that fit in a message cut short by the capture bound (a long TCP
/// answer): records are read one by one until the bytes run out.
fn salvage_addresses(bytes: &[u8]) -> Answers {
    let Ok(records) = Records::new(bytes) else {
        return Answers::new();
    };
    records
        .map_while(Result::ok)
        .take_while(|record| record.answer)
        .filter_map(|record| address(record.rtype, record.rdata))
        .collect()
}

thread_local! {
    /// Where question names are spelled out before they are copied, once, into the `Arc<str>`
    /// every index of the query shares.
    static NAME_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The question name of a message (it starts at offset 12) and the offset just past it. A
/// name written without compression pointers (as question names are) is looked up by its wire
/// bytes first (`QName::from_wire`).
fn question_name(bytes: &[u8]) -> Result<(crate::qname::QName, usize), DecodeError> {
    let spell = || {
        NAME_SCRATCH.with_borrow_mut(|scratch| {
            let end = read_name_into(bytes, 12, scratch)?;
            let text = std::str::from_utf8(scratch)
                .map_err(|_| DecodeError::BadQuestion("name is not text"))?;
            Ok((crate::qname::QName::new(text), end))
        })
    };
    match plain_name_end(bytes, 12) {
        Some(end) => {
            let name = crate::qname::QName::from_wire(&bytes[12..end], || spell().map(|(n, _)| n))?;
            Ok((name, end))
        }
        None => spell(),
    }
}

/// The end of the name at `start` when it has no compression pointer and its wire form fits
/// in `QName::from_wire`'s cache; `None` otherwise (and for anything malformed, left to
/// `read_name_into`).
fn plain_name_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    loop {
        let len = usize::from(*bytes.get(pos)?);
        if len == 0 {
            return (pos + 1 - start <= WIRE_NAME_MAX).then_some(pos + 1);
        }
        if len & 0xc0 != 0 {
            return None;
        }
        pos += 1 + len;
        if pos - start >= WIRE_NAME_MAX {
            return None;
        }
    }
}

/// Returns the name in presentation form and the offset just past it in the message.
fn read_name(bytes: &[u8], start: usize) -> Result<(String, usize), DecodeError> {
    let mut name = Vec::with_capacity(64);
    let end = read_name_into(bytes, start, &mut name)?;
    // Only printable ASCII is written, so this never fails in practice.
    let name = String::from_utf8(name).map_err(|_| DecodeError::BadQuestion("name is not text"))?;
    Ok((name, end))
}

/// `read_name` into `name` (cleared first), so that its buffer can be reused. Only printable
/// ASCII is written: anything else in a label is escaped (`\.`, `\ddd`; RFC 4343, RFC 1035
/// 5.1).
fn read_name_into(bytes: &[u8], start: usize, name: &mut Vec<u8>) -> Result<usize, DecodeError> {
    const MAX_POINTERS: usize = 16;
    name.clear();
    let mut pos = start;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *bytes
            .get(pos)
            .ok_or(DecodeError::BadQuestion("name runs past the message"))?
            as usize;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    let end = end.unwrap_or(pos + 1);
                    if name.is_empty() {
                        name.push(b'.');
                    }
                    return Ok(end);
                }
                let label = bytes
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(DecodeError::BadQuestion("label runs past the message"))?;
                // Almost every label is plain printable ASCII: copied as it is.
                if label
                    .iter()
                    .all(|&b| matches!(b, 0x21..=0x7e) && b != b'.' && b != b'\\')
                {
                    name.extend_from_slice(label);
                } else {
                    for &b in label {
                        match b {
                            b'.' | b'\\' => name.extend_from_slice(&[b'\\', b]),
                            0x21..=0x7e => name.push(b),
                            _ => name.extend_from_slice(&[
                                b'\\',
                                b'0' + b / 100,
                                b'0' + b / 10 % 10,
                                b'0' + b % 10,
                            ]),
                        }
                    }
                }
                name.push(b'.');
                if name.len() > 1024 {
                    return Err(DecodeError::BadQuestion("name too long"));
                }
                pos += 1 + len;
            }
            0xc0 => {
                let low = *bytes
                    .get(pos + 1)
                    .ok_or(DecodeError::BadQuestion("pointer runs past the message"))?;
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return Err(DecodeError::BadQuestion("compression pointer loop"));
                }
                if end.is_none() {
                    end = Some(pos + 2);
                }
                pos = ((len & 0x3f) << 8) | low as usize;
            }
            _ => return Err(DecodeError::BadQuestion("reserved label type")),
        }
    }
}

/// Response codes the diagnoses and the live view tell apart (RFC 1035 4.1.1).
pub const RCODE_NOERROR: u16 = 0;
pub const RCODE_SERVFAIL: u16 = 2;
pub const RCODE_NXDOMAIN: u16 = 3;

/// RFC 6895 mnemonic of a response code.
pub fn rcode_name(rcode: u16) -> String {
    rcode_mnemonic(rcode).into_owned()
}

/// `rcode_name` without an allocation for the codes that have a name.
pub fn rcode_mnemonic(rcode: u16) -> Cow<'static, str> {
    Cow::Borrowed(match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADVERS",
        23 => "BADCOOKIE",
        other => return Cow::Owned(format!("RCODE{other}")),
    })
}

/// Type mnemonic, or the RFC 3597 generic form `TYPE1234` for types hickory does not know.
pub fn qtype_name(qtype: u16) -> String {
    qtype_mnemonic(qtype).into_owned()
}

/// `qtype_name` without an allocation for the types that have a name.
pub fn qtype_mnemonic(qtype: u16) -> Cow<'static, str> {
    match RecordType::from(qtype) {
        RecordType::Unknown(code) => Cow::Owned(format!("TYPE{code}")),
        known => Cow::Borrowed(<&'static str>::from(known)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnsprobe_common::DnsEvent;

    /// `dig www.example.com A` as sent by dig 9.18 (with EDNS and a cookie stripped).
    const QUERY_A: &[u8] = &[
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // header
        3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0x00, 0x01, 0x00, 0x01,
    ];

    /// The response: one A record 93.184.216.34 with a compression pointer to the question.
    fn response_a() -> Vec<u8> {
        let mut r = QUERY_A.to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1; // ancount
        r.extend_from_slice(&[
            0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x04, 93, 184, 216,
            34,
        ]);
        r
    }

    #[test]
    fn query_decodes() {
        let m = decode_message(QUERY_A, false).unwrap();
        assert_eq!(m.id, 0x1234);
        assert!(!m.is_response);
        assert_eq!(&*m.question.name, "www.example.com.");
        assert_eq!(qtype_name(m.question.qtype), "A");
        assert!(m.answers.is_empty());
    }

    /// Label bytes that are not printable, or that are the separator or the escape character,
    /// are escaped as zone files write them; the result is always printable ASCII.
    #[test]
    fn unusual_label_bytes_are_escaped() {
        let mut msg = QUERY_A[..12].to_vec();
        msg.extend_from_slice(&[5, b'a', b'.', b'\\', 0x00, b' ', 2, 0xc3, 0xa9, 0]);
        msg.extend_from_slice(&[0, 1, 0, 1]);
        let m = decode_message(&msg, false).unwrap();
        assert_eq!(&*m.question.name, "a\\.\\\\\\000\\032.\\195\\169.");
        let (name, end) = read_name(&msg, 12).unwrap();
        assert_eq!(name, &*m.question.name);
        assert_eq!(end, msg.len() - 4);
    }

    /// Names found by their wire bytes read exactly as names spelled out from their labels,
    /// case and escapes included, whichever was decoded before, and whatever shares a slot.
    #[test]
    fn names_known_by_their_wire_bytes_read_as_spelled_out() {
        let message = |labels: &[&[u8]]| {
            let mut msg = QUERY_A[..12].to_vec();
            for label in labels {
                msg.push(label.len() as u8);
                msg.extend_from_slice(label);
            }
            msg.extend_from_slice(&[0, 0, 1, 0, 1]);
            msg
        };
        let mut messages = Vec::new();
        for i in 0..2000u32 {
            let label = format!("n{i}");
            messages.push(message(&[label.as_bytes(), b"example", b"com"]));
            messages.push(message(&[
                label.to_uppercase().as_bytes(),
                b"Example",
                b"com",
            ]));
        }
        messages.push(message(&[b"a.b", b"\\", &[0, 0xff, b' ']]));
        // Longer than the wire cache holds, and exactly as long.
        messages.push(message(&[&[b'x'; 63], &[b'x'; 63]]));
        messages.push(message(&[&[b'y'; 63], &[b'y'; 61]]));
        messages.push(message(&[&[b'z'; 63], &[b'z'; 62]]));
        // Twice over, so that the second round finds what the first one stored.
        for msg in messages.iter().chain(&messages) {
            let decoded = decode_message(msg, false).unwrap();
            let (spelled, end) = read_name(msg, 12).unwrap();
            assert_eq!(&*decoded.question.name, spelled);
            assert_eq!(end, msg.len() - 4);
            assert_eq!(decoded.question.qtype, 1);
        }
        let a = decode_message(&messages[0], false).unwrap().question.name;
        let b = decode_message(&messages[0], false).unwrap().question.name;
        assert_eq!(a.as_ptr(), b.as_ptr(), "one name, one text");
    }

    #[test]
    fn response_decodes_answers() {
        let m = decode_message(&response_a(), false).unwrap();
        assert!(m.is_response);
        assert_eq!(rcode_name(m.rcode), "NOERROR");
        assert_eq!(m.answers[..], ["93.184.216.34"]);
    }

    /// The quick reader of common answers and hickory-proto agree, EDNS extended codes
    /// included; other record types are left to hickory-proto.
    #[test]
    fn common_answers_read_as_hickory_reads_them() {
        use hickory_proto::{
            op::{Edns, Message as HMessage, MessageType, Query, ResponseCode},
            rr::{rdata, Name, Record},
        };
        let name = Name::from_ascii("www.Example.com.").unwrap();
        let alias = Name::from_ascii("edge.cdn.example.net.").unwrap();
        let mut m = HMessage::query();
        m.metadata.id = 7;
        m.metadata.message_type = MessageType::Response;
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::CNAME(rdata::CNAME(alias.clone())),
        ));
        m.add_answer(Record::from_rdata(
            alias.clone(),
            60,
            RData::A(rdata::A::new(10, 1, 2, 3)),
        ));
        m.add_answer(Record::from_rdata(
            alias.clone(),
            60,
            RData::AAAA(rdata::AAAA::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
        ));
        for code in [ResponseCode::NoError, ResponseCode::BADCOOKIE] {
            m.metadata.response_code = code;
            m.set_edns(Edns::new());
            let bytes = m.to_vec().unwrap();
            let (rcode, answers) = read_common_answers(&bytes, None).expect("common answers");
            let reference = HMessage::from_vec(&bytes).unwrap();
            assert_eq!(rcode, u16::from(reference.metadata.response_code));
            let expected: Vec<String> = reference
                .answers
                .iter()
                .map(|r| match &r.data {
                    RData::A(a) => a.0.to_string(),
                    RData::AAAA(a) => a.0.to_string(),
                    other => other.to_string(),
                })
                .collect();
            let answers: Vec<String> = answers.iter().map(Answer::to_string).collect();
            assert_eq!(answers, expected);
        }
        // A TXT answer is not common: hickory-proto reads it.
        m.add_answer(Record::from_rdata(
            name,
            60,
            RData::TXT(rdata::TXT::new(vec!["x".into()])),
        ));
        let bytes = m.to_vec().unwrap();
        assert!(read_common_answers(&bytes, None).is_none());
        assert_eq!(decode_message(&bytes, false).unwrap().answers.len(), 4);
    }

    #[test]
    fn records_are_found_after_one_question_or_several() {
        use hickory_proto::{
            op::{Edns, Message as HMessage, MessageType, Query},
            rr::{rdata, Name, Record},
        };
        let name = Name::from_ascii("www.example.com.").unwrap();
        for questions in 1..=2 {
            let mut m = HMessage::query();
            m.metadata.id = 9;
            m.add_query(Query::query(name.clone(), RecordType::A));
            if questions == 2 {
                m.add_query(Query::query(name.clone(), RecordType::AAAA));
            }
            m.set_edns(Edns::new());
            // Where the records start, known from the question read, or found from the header.
            let bytes = m.to_vec().unwrap();
            let (_, question_end) = header_and_question(&bytes).unwrap();
            let from_header = Records::new(&bytes).unwrap().pos;
            match records_after(&bytes, question_end) {
                Some(at) => assert_eq!((questions, at), (1, from_header)),
                None => assert_eq!(questions, 2),
            }
            // A query: its OPT record must be framed right, wherever the walk starts.
            let query = decode_message(&bytes, false).unwrap();
            assert!(!query.is_response, "{questions} question(s)");
            m.metadata.message_type = MessageType::Response;
            m.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(rdata::A::new(10, 1, 2, 3)),
            ));
            let bytes = m.to_vec().unwrap();
            let response = decode_message(&bytes, false).unwrap();
            assert_eq!(
                response.answers[..],
                ["10.1.2.3"],
                "{questions} question(s)"
            );
            // A lying answer count is caught from either start.
            let mut lying = bytes.clone();
            lying[7] = 2;
            assert!(
                decode_message(&lying, false).is_err(),
                "{questions} question(s)"
            );
        }
    }

    #[test]
    fn nxdomain_rcode() {
        let mut r = QUERY_A.to_vec();
        r[2] = 0x81;
        r[3] = 0x83;
        let m = decode_message(&r, false).unwrap();
        assert_eq!(rcode_name(m.rcode), "NXDOMAIN");
    }

    #[test]
    fn truncated_header_is_an_error_not_a_panic() {
        for len in 0..QUERY_A.len() {
            let res = decode_message(&QUERY_A[..len], false);
            assert!(res.is_err(), "prefix of {len} bytes decoded");
        }
    }

    #[test]
    fn cut_short_capture_keeps_header_and_question() {
        let full = response_a();
        // Cut inside the answer section, as the kernel's bounded copy would.
        let m = decode_message(&full[..full.len() - 3], true).unwrap();
        assert!(m.partial);
        assert_eq!(m.id, 0x1234);
        assert!(m.is_response);
        assert_eq!(&*m.question.name, "www.example.com.");
        assert!(m.answers.is_empty());
    }

    #[test]
    fn cut_short_answers_keep_the_records_that_fit() {
        // Three A records, the last one cut in its address.
        let mut r = QUERY_A.to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 3;
        for last in [1u8, 2, 3] {
            r.extend_from_slice(&[
                0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x04, 10, 0, 0,
                last,
            ]);
        }
        let m = decode_message(&r[..r.len() - 2], true).unwrap();
        assert!(m.partial);
        assert_eq!(m.answers[..], ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn compression_pointer_loop_is_rejected() {
        let mut msg = QUERY_A[..12].to_vec();
        msg.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
        assert!(decode_message(&msg, false).is_err());
        assert_eq!(
            parse_header_and_question(&msg).unwrap_err(),
            DecodeError::BadQuestion("compression pointer loop")
        );
    }

    #[test]
    fn lying_counts_are_malformed() {
        let mut msg = QUERY_A.to_vec();
        msg[7] = 5; // claims five answers, has none
        assert!(matches!(
            decode_message(&msg, false),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn zero_question_is_rejected() {
        let mut msg = QUERY_A[..12].to_vec();
        msg[5] = 0;
        assert!(decode_message(&msg, false).is_err());
        assert!(decode_message(&msg, true).is_err());
    }

    #[test]
    fn tcp_segments_strip_the_length_prefix() {
        let mut seg = vec![0, QUERY_A.len() as u8];
        seg.extend_from_slice(QUERY_A);
        let m = decode_tcp_segment(&seg).unwrap();
        assert_eq!(m.id, 0x1234);
        assert!(!m.partial);
        // The first segment of a message spread over several: header and question survive.
        let resp = response_a();
        let mut seg = (resp.len() as u16).to_be_bytes().to_vec();
        seg.extend_from_slice(&resp[..resp.len() - 3]);
        let m = decode_tcp_segment(&seg).unwrap();
        assert!(m.is_response);
        assert!(m.partial);
        // The one answer record was cut: nothing to salvage.
        assert!(m.answers.is_empty());
        // A continuation segment is not a message start.
        assert!(decode_tcp_segment(&[0, 3, 1, 2, 3]).is_err());
        assert!(decode_tcp_segment(&[0]).is_err());
        // Zero-length message.
        assert_eq!(
            decode_tcp_segment(&[0, 0]).unwrap_err(),
            DecodeError::NotMessageStart(0)
        );
    }

    #[test]
    fn unknown_type_uses_generic_form() {
        assert_eq!(qtype_name(65280), "TYPE65280");
        assert_eq!(qtype_name(28), "AAAA");
        assert_eq!(rcode_name(99), "RCODE99");
    }

    #[test]
    fn short_record_rejected() {
        assert!(matches!(
            read_event(&[0u8; 10]),
            Err(DecodeError::ShortRecord(10))
        ));
    }

    #[test]
    fn event_roundtrip() {
        let mut ev = query_event(FAMILY_IPV6);
        ev.header.saddr[15] = 1;
        ev.header.daddr[15] = 2;
        ev.header.sport = 40000;
        ev.header.dport = 53;
        ev.header.pid_tgid = (1234u64 << 32) | 1240;
        ev.header.comm[..3].copy_from_slice(b"dig");
        let p = decode_event(&read_event(event_bytes(&ev)).unwrap()).unwrap();
        assert_eq!(p.src.to_string(), "[::1]:40000");
        assert_eq!(p.dst.to_string(), "[::2]:53");
        assert_eq!(p.pid, Some(1234));
        assert_eq!(p.tid, Some(1240));
        assert_eq!(
            p.comm.map(|c| c.text().into_owned()).as_deref(),
            Some("dig")
        );
        assert_eq!(p.message.id, 0x1234);
    }

    #[test]
    fn bad_capture_length_rejected() {
        let mut ev: DnsEvent = unsafe { std::mem::zeroed() };
        ev.header.family = FAMILY_IPV4;
        ev.header.l4_proto = PROTO_UDP;
        ev.header.cap_len = 9999;
        assert_eq!(
            decode_event(&read_event(event_bytes(&ev)).unwrap()).unwrap_err(),
            DecodeError::BadCaptureLength(9999)
        );
    }

    #[test]
    fn every_event_size_decodes_and_none_is_read_past_its_end() {
        let ev = query_event(FAMILY_IPV4);
        for area in dnsprobe_common::DNS_CAPTURE_CLASSES {
            // A record of the smaller size is the larger one's prefix.
            let record = &event_bytes(&ev)[..DNS_EVENT_HEADER_LEN + area];
            let event = read_event(record).unwrap();
            assert_eq!(event.msg.len(), area);
            assert_eq!(decode_event(&event).unwrap().message.id, 0x1234);
        }
        // A message area shorter than the length claimed is an error, not a read beyond.
        let record = &event_bytes(&ev)[..DNS_EVENT_HEADER_LEN + QUERY_A.len() - 1];
        assert_eq!(
            decode_event(&read_event(record).unwrap()).unwrap_err(),
            DecodeError::BadCaptureLength(QUERY_A.len() as u32)
        );
        assert!(matches!(
            read_event(&record[..DNS_EVENT_HEADER_LEN - 1]),
            Err(DecodeError::ShortRecord(_))
        ));
    }

    #[test]
    fn thread_names_as_the_kernel_gives_them() {
        assert_eq!(Comm::from_kernel(&[0; 16]), None);
        let full = *b"sixteen-byte-nam";
        assert_eq!(Comm::from_kernel(&full).unwrap().text(), "sixteen-byte-nam");
        let mut odd = [0u8; 16];
        odd[..4].copy_from_slice(b"a\xffb\0");
        assert_eq!(Comm::from_kernel(&odd).unwrap().text(), "a\u{fffd}b");
        assert!(matches!(
            Comm::from("dig").text(),
            std::borrow::Cow::Borrowed("dig")
        ));
    }

    /// `QUERY_A` sent over UDP, copied whole, in a zeroed event of the largest size.
    fn query_event(family: u8) -> DnsEvent {
        // SAFETY: DnsEvent is plain old data; all zeroes is a valid value.
        let mut ev: DnsEvent = unsafe { std::mem::zeroed() };
        ev.header.family = family;
        ev.header.direction = DIR_EGRESS;
        ev.header.l4_proto = PROTO_UDP;
        ev.msg[..QUERY_A.len()].copy_from_slice(QUERY_A);
        ev.header.cap_len = QUERY_A.len() as u32;
        ev.header.msg_len = QUERY_A.len() as u32;
        ev
    }

    fn event_bytes(ev: &DnsEvent) -> &[u8] {
        // SAFETY: the bytes of a plain-old-data value, for its lifetime.
        unsafe {
            std::slice::from_raw_parts((ev as *const DnsEvent).cast::<u8>(), size_of::<DnsEvent>())
        }
    }
}
