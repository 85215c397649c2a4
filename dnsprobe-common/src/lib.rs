//! Types shared by the kernel programs and the userspace daemon.
//!
//! Everything here crosses the kernel/user boundary as raw bytes: `#[repr(C)]`, fixed-width
//! integers, explicit padding, no `bool` and no Rust enums.
#![no_std]

/// Bytes of the DNS message copied into each event. RFC 1035 caps plain UDP messages at 512
/// bytes; larger (EDNS) messages are copied up to this bound and flagged by `msg_len > cap_len`.
pub const DNS_CAPTURE_LEN: usize = 512;

/// Sizes of an event's message area, smallest first. The kernel reserves the smallest event
/// that holds the bytes it copies: most DNS messages are a few dozen bytes, and a ring of
/// 512-byte areas held a third as many of them. Powers of two: the kernel program bounds the
/// copy length by masking; and multiples of 8, so no event has tail padding.
pub const DNS_CAPTURE_CLASSES: [usize; 3] = [128, 256, DNS_CAPTURE_LEN];

/// How many ports the kernel programs can watch at once (`--ports`).
pub const MAX_PORTS: usize = 8;

/// `DnsEvent::direction`: the packet leaves a socket (a query sent by a client).
pub const DIR_EGRESS: u8 = 0;
/// `DnsEvent::direction`: the packet arrives at a socket (a response received by a client).
pub const DIR_INGRESS: u8 = 1;

/// `DnsEvent::family` values, as in `AF_INET` / `AF_INET6`.
pub const FAMILY_IPV4: u8 = 2;
pub const FAMILY_IPV6: u8 = 10;

/// `DnsEvent::l4_proto` values (IP protocol numbers).
pub const PROTO_UDP: u8 = 17;
pub const PROTO_TCP: u8 = 6;

/// Indices into the kernel's per-CPU `STATS` array.
pub const STAT_EVENTS: u32 = 0;
/// A ring-buffer reservation failed: the event is lost.
pub const STAT_RINGBUF_FULL: u32 = 1;
/// A DNS-port packet whose headers could not be read (truncated, odd layout).
pub const STAT_UNPARSEABLE: u32 = 2;
/// A drop event could not be handed over: the drop ring buffer was full.
pub const STAT_DROP_RINGBUF_FULL: u32 = 3;
/// DNS-port packets seen dropped by the kernel.
pub const STAT_DROPS: u32 = 4;
/// Of `STAT_RINGBUF_FULL`: events of queries (egress) and of responses (ingress) lost. A lost
/// query event loses the query; a lost response event makes an answered query look unanswered.
pub const STAT_LOST_EGRESS: u32 = 5;
pub const STAT_LOST_INGRESS: u32 = 6;
pub const STAT_COUNT: u32 = 8;

/// Bytes of a dropped packet's DNS payload copied (enough for header and a typical question).
pub const DROP_CAPTURE_LEN: usize = 128;

/// Offsets of kernel struct members, read from the running kernel's BTF by userspace and set
/// as a read-only global, so the drop program works across kernel versions without CO-RE.
/// `OFFSET_UNKNOWN` disables what depends on a member.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    /// `net_device.nd_net.net`
    pub dev_net: u32,
    /// `sock_common.skc_net.net` (`struct sock` starts with its `sock_common`)
    pub sk_net: u32,
    /// `net.ns.inum`
    pub net_inum: u32,
    /// Non-zero once userspace has filled the offsets in.
    pub valid: u32,
}

pub const OFFSET_UNKNOWN: u32 = u32::MAX;

impl KernelOffsets {
    pub const UNSET: KernelOffsets = KernelOffsets {
        skb_head: OFFSET_UNKNOWN,
        skb_network_header: OFFSET_UNKNOWN,
        skb_dev: OFFSET_UNKNOWN,
        skb_sk: OFFSET_UNKNOWN,
        dev_net: OFFSET_UNKNOWN,
        sk_net: OFFSET_UNKNOWN,
        net_inum: OFFSET_UNKNOWN,
        valid: 0,
    };
}

/// A DNS packet (either direction, UDP or TCP) that the kernel freed as a drop.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DropEvent {
    pub ts_ns: u64,
    /// Kernel address where the drop happened (`kfree_skb` caller); a symbol via /proc/kallsyms.
    pub location: u64,
    /// Inode number of the network namespace (0 when neither device nor socket told it).
    pub netns_inum: u32,
    /// `enum skb_drop_reason` value of the running kernel.
    pub reason: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub l4_proto: u8,
    pub _pad0: [u8; 2],
    /// Length of the L4 payload per the IP header.
    pub payload_len: u32,
    /// Bytes of it copied into `payload` (the raw L4 payload: TCP keeps its length prefix).
    pub cap_len: u32,
    pub payload: [u8; DROP_CAPTURE_LEN],
}

const _: () = assert!(core::mem::size_of::<DropEvent>() == 72 + DROP_CAPTURE_LEN);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 32);

/// Ports watched by the kernel programs, set as a read-only global at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Ports in host byte order; unused slots are 0 (never matches a real port filter since
    /// port 0 is not a valid UDP destination).
    pub ports: [u16; MAX_PORTS],
}

impl PortConfig {
    pub const DEFAULT: PortConfig = PortConfig {
        ports: [53, 0, 0, 0, 0, 0, 0, 0],
    };

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        // Unrolled by the compiler: a bounded loop over a constant-size array.
        let mut i = 0;
        while i < MAX_PORTS {
            if self.ports[i] != 0 && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// What the kernel tells of one DNS packet besides its message: the head of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEventHeader {
    /// `bpf_ktime_get_ns()` when the packet passed the hook (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `bpf_get_socket_cookie()`: identifies the socket for the life of the kernel.
    pub socket_cookie: u64,
    /// Cgroup v2 id of the socket (the inode number of the cgroup's directory).
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()` on egress (process context), 0 on ingress.
    pub pid_tgid: u64,
    /// Source and destination addresses; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// `DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// `PROTO_UDP` or `PROTO_TCP`.
    pub l4_proto: u8,
    pub _pad0: u8,
    /// Length of the DNS message as carried by the packet (UDP payload length).
    pub msg_len: u32,
    /// Bytes of it copied into the event's `msg` (at most its size).
    pub cap_len: u32,
    /// `bpf_get_current_comm()` on egress, zeroed on ingress.
    pub comm: [u8; 16],
}

/// One DNS packet seen by a cgroup_skb program, with room for `N` bytes of its message: one of
/// `DNS_CAPTURE_CLASSES`. A ring-buffer record's length tells which.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEventOf<const N: usize> {
    pub header: DnsEventHeader,
    pub msg: [u8; N],
}

/// An event of the largest size.
pub type DnsEvent = DnsEventOf<DNS_CAPTURE_LEN>;

/// Bytes of an event before its message area.
pub const DNS_EVENT_HEADER_LEN: usize = core::mem::size_of::<DnsEventHeader>();

// No implicit padding: the layout above is the wire format between kernel and userspace.
const _: () = assert!(DNS_EVENT_HEADER_LEN == 96);
const _: () = assert!(core::mem::size_of::<DnsEvent>() == DNS_EVENT_HEADER_LEN + DNS_CAPTURE_LEN);
const _: () = {
    let mut i = 0;
    while i < DNS_CAPTURE_CLASSES.len() {
        assert!(DNS_CAPTURE_CLASSES[i].is_power_of_two() && DNS_CAPTURE_CLASSES[i] >= 8);
        assert!(i == 0 || DNS_CAPTURE_CLASSES[i - 1] < DNS_CAPTURE_CLASSES[i]);
        i += 1;
    }
    assert!(DNS_CAPTURE_CLASSES[DNS_CAPTURE_CLASSES.len() - 1] == DNS_CAPTURE_LEN);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are `#[repr(C)]`, made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PortConfig {}
    unsafe impl aya::Pod for super::DnsEventHeader {}
    unsafe impl<const N: usize> aya::Pod for super::DnsEventOf<N> {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}
