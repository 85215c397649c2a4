//! Packet drops of DNS traffic, from the kernel's `kfree_skb` tracepoint: decoded, named from
//! the running kernel's BTF and symbol table, and classified.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use dnsprobe_common::{DropEvent, DROP_CAPTURE_LEN, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP};

use crate::decode::{parse_header_and_question, DnsMessage, Transport};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DropDecodeError {
    #[error("ring-buffer record of {0} bytes is shorter than a drop event")]
    ShortRecord(usize),
    #[error("drop event has unknown address family {0}")]
    BadFamily(u8),
    #[error("drop event claims {0} captured bytes")]
    BadCaptureLength(u32),
}

/// Names of `enum skb_drop_reason` values of the running kernel (they differ between versions).
#[derive(Debug, Default, Clone)]
pub struct DropReasons {
    names: HashMap<u32, String>,
}

impl DropReasons {
    /// From `(name, value)` pairs as BTF lists them (`SKB_DROP_REASON_NO_SOCKET`, 3).
    pub fn new(values: impl IntoIterator<Item = (String, i64)>) -> Self {
        let names = values
            .into_iter()
            .filter_map(|(name, value)| {
                let value = u32::try_from(value).ok()?;
                let short = name
                    .strip_prefix("SKB_DROP_REASON_")
                    .unwrap_or(&name)
                    .to_owned();
                Some((value, short))
            })
            .collect();
        Self { names }
    }

    pub fn name(&self, value: u32) -> String {
        self.names
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{value}"))
    }

    pub fn value(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find_map(|(value, n)| (n == name).then_some(*value))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// Kernel text symbols, to turn a drop location into `nf_hook_slow+0x4c`.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// Start addresses, sorted.
    addrs: Vec<u64>,
    /// Where each symbol's name ends in `names`; it starts where the previous one ends.
    name_ends: Vec<u32>,
    /// Every name, one after the other. A kernel has over 100,000 text symbols: a `String`
    /// each made them most of the daemon's heap when idle.
    names: String,
}

impl KernelSymbols {
    /// Reads /proc/kallsyms; addresses read as 0 when kptr_restrict hides them, leaving the
    /// table empty (locations are then shown as raw addresses).
    pub fn load() -> Self {
        let Ok(text) = fs::read_to_string("/proc/kallsyms") else {
            return Self::default();
        };
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then_some((addr, name))
            })
            .collect();
        symbols.sort_unstable_by_key(|(addr, _)| *addr);
        let mut table = Self {
            addrs: Vec::with_capacity(symbols.len()),
            name_ends: Vec::with_capacity(symbols.len()),
            names: String::with_capacity(symbols.iter().map(|(_, n)| n.len()).sum()),
        };
        for (addr, name) in symbols {
            let Ok(end) = u32::try_from(table.names.len() + name.len()) else {
                // Gigabytes of names: not a real kernel. Later symbols stay unnamed.
                break;
            };
            table.names.push_str(name);
            table.addrs.push(addr);
            table.name_ends.push(end);
        }
        table
    }

    pub fn symbolize(&self, addr: u64) -> String {
        let idx = self.addrs.partition_point(|a| *a <= addr);
        let Some(i) = idx.checked_sub(1) else {
            return format!("{addr:#x}");
        };
        let start = i.checked_sub(1).map_or(0, |p| self.name_ends[p] as usize);
        let name = &self.names[start..self.name_ends[i] as usize];
        format!("{name}+{:#x}", addr - self.addrs[i])
    }
}

/// A DNS packet the kernel dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    pub ts_ns: u64,
    pub reason: u32,
    pub location: u64,
    pub netns_inum: u32,
    pub transport: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Header and question of the dropped message when the copy allowed reading them.
    pub message: Option<DnsMessage>,
}

impl Drop {
    /// The DNS id, when the payload was readable.
    pub fn dns_id(&self) -> Option<u16> {
        self.message.as_ref().map(|m| m.id)
    }
}

pub fn read_drop_event(bytes: &[u8]) -> Result<DropEvent, DropDecodeError> {
    if bytes.len() < size_of::<DropEvent>() {
        return Err(DropDecodeError::ShortRecord(bytes.len()));
    }
    // SAFETY: length checked; DropEvent is plain old data valid for any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

pub fn decode_drop(event: &DropEvent) -> Result<Drop, DropDecodeError> {
    let (src_ip, dst_ip) = match event.family {
        FAMILY_IPV4 => (v4(&event.saddr), v4(&event.daddr)),
        FAMILY_IPV6 => (
            IpAddr::V6(Ipv6Addr::from(event.saddr)),
            IpAddr::V6(Ipv6Addr::from(event.daddr)),
        ),
        other => return Err(DropDecodeError::BadFamily(other)),
    };
    let cap = event.cap_len as usize;
    if cap > DROP_CAPTURE_LEN {
        return Err(DropDecodeError::BadCaptureLength(event.cap_len));
    }
    let transport = if event.l4_proto == PROTO_TCP {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let payload = &event.payload[..cap];
    // DNS over TCP prefixes each message with its length.
    let dns = match transport {
        Transport::Tcp => payload.get(2..).unwrap_or(&[]),
        Transport::Udp => payload,
    };
    Ok(Drop {
        ts_ns: event.ts_ns,
        reason: event.reason,
        location: event.location,
        netns_inum: event.netns_inum,
        transport,
        src: SocketAddr::new(src_ip, event.sport),
        dst: SocketAddr::new(dst_ip, event.dport),
        message: parse_header_and_question(dns).ok(),
    })
}

fn v4(addr: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_named_from_the_kernel_list() {
        let reasons = DropReasons::new([
            ("SKB_DROP_REASON_NOT_SPECIFIED".to_owned(), 2),
            ("SKB_DROP_REASON_NETFILTER_DROP".to_owned(), 12),
            ("SKB_DROP_REASON_MAX".to_owned(), -1),
        ]);
        assert_eq!(reasons.name(12), "NETFILTER_DROP");
        assert_eq!(reasons.name(2), "NOT_SPECIFIED");
        assert_eq!(reasons.name(99), "REASON_99");
        assert_eq!(reasons.value("NETFILTER_DROP"), Some(12));
    }

    #[test]
    fn symbols_resolve_to_the_enclosing_function() {
        let syms = KernelSymbols::parse(
            "ffffffff81000000 T _stext\nffffffff81a00000 t nf_hook_slow\nffffffff81a00100 T next_fn\nffffffff81b00000 d some_data\n",
        );
        assert_eq!(syms.symbolize(0xffffffff81a0004c), "nf_hook_slow+0x4c");
        assert_eq!(syms.symbolize(0xffffffff81a00100), "next_fn+0x0");
        assert_eq!(syms.symbolize(0x10), "0x10");
    }

    #[test]
    fn drop_event_decodes_udp_and_tcp() {
        let mut ev: DropEvent = unsafe { std::mem::zeroed() };
        ev.family = FAMILY_IPV4;
        ev.l4_proto = dnsprobe_common::PROTO_UDP;
        ev.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 96, 0, 10]);
        ev.sport = 40000;
        ev.dport = 53;
        let query = [
            0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        ev.payload[..query.len()].copy_from_slice(&query);
        ev.cap_len = query.len() as u32;
        let d = decode_drop(&ev).unwrap();
        assert_eq!(d.dns_id(), Some(0xabcd));
        assert_eq!(d.src.to_string(), "10.0.0.1:40000");
        assert_eq!(&*d.message.unwrap().question.name, "a.");

        ev.l4_proto = PROTO_TCP;
        ev.payload[0] = 0;
        ev.payload[1] = query.len() as u8;
        ev.payload[2..2 + query.len()].copy_from_slice(&query);
        ev.cap_len = 2 + query.len() as u32;
        let d = decode_drop(&ev).unwrap();
        assert_eq!(d.transport, Transport::Tcp);
        assert_eq!(d.dns_id(), Some(0xabcd));
    }

    #[test]
    fn unreadable_payload_still_gives_a_drop() {
        let mut ev: DropEvent = unsafe { std::mem::zeroed() };
        ev.family = FAMILY_IPV6;
        let d = decode_drop(&ev).unwrap();
        assert_eq!(d.dns_id(), None);
        ev.cap_len = 4096;
        assert_eq!(
            decode_drop(&ev).unwrap_err(),
            DropDecodeError::BadCaptureLength(4096)
        );
    }
}
