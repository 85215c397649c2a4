//! Kernel programs of dnsprobe: `cgroup_skb` ingress and egress hooks that copy DNS packets of
//! every socket on the machine into a ring buffer. Parsing happens in userspace; here we only
//! find the UDP header, decide whether the packet is DNS, and copy a bounded prefix of it.
// Host builds (clippy on the whole workspace) link std through feature unification, so the
// freestanding attributes and the panic handler apply to the BPF target only.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{
            bpf_get_socket_cookie, bpf_probe_read_kernel as probe_read_kernel_raw,
            bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::{btf_tracepoint, cgroup_skb, map},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, SkBuffContext},
};
use dnsprobe_common::{
    DnsEventOf, DropEvent, KernelOffsets, PortConfig, DIR_EGRESS, DIR_INGRESS, DNS_CAPTURE_CLASSES,
    DNS_CAPTURE_LEN, DROP_CAPTURE_LEN, FAMILY_IPV4, FAMILY_IPV6, MAX_PORTS, OFFSET_UNKNOWN,
    PROTO_TCP, PROTO_UDP, STAT_COUNT, STAT_DROPS, STAT_DROP_RINGBUF_FULL, STAT_EVENTS,
    STAT_LOST_EGRESS, STAT_LOST_INGRESS, STAT_RINGBUF_FULL, STAT_UNPARSEABLE,
};

/// The daemon is woken once this fraction of the event ring waits to be read; below that it
/// reads at its own tick (`--flush-interval`, 1 s by default). A wake-up for every few records
/// cost the daemon more than the records at low rates, and waking it at an eighth leaves it
/// the other seven to catch up in. At a thousand queries a second the tick reads them all (one
/// wake-up a second). While that much waits, every event wakes it again, so no wake-up can be
/// missed.
const WAKEUP_FRACTION: u64 = 8;

/// Overwritten by userspace at load time (`--ports`); read-only to the programs.
#[no_mangle]
static PORT_CONFIG: PortConfig = PortConfig::DEFAULT;

/// Resized by userspace at load time (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Offsets into kernel structs, from the running kernel's BTF (set by userspace at load time).
#[no_mangle]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::UNSET;

/// Drops are rare next to packets; a separate ring keeps a drop storm from starving capture.
#[map]
static DROPS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;
/// IPv6 extension headers walked before giving up on finding the UDP header.
const MAX_IPV6_EXT_HEADERS: usize = 4;

#[cgroup_skb]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_capture(&ctx, DIR_EGRESS);
    // Observe only: never drop.
    1
}

#[cgroup_skb]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_capture(&ctx, DIR_INGRESS);
    1
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Where the UDP header is and what addresses surround it.
struct L3 {
    family: u8,
    /// `PROTO_UDP` or `PROTO_TCP`.
    proto: u8,
    l4_offset: usize,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// Reads a `T` at `offset` from the network header: straight from the packet when it lies in the
/// linear area (no helper call: this is the path every non-DNS packet takes), otherwise
/// through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Result<T, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's data pointers is always allowed for cgroup_skb.
    let (data, data_end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if data + offset + size_of::<T>() <= data_end {
        // SAFETY: bounds checked against data_end just above (and by the verifier).
        Ok(unsafe { core::ptr::read_unaligned((data + offset) as *const T) })
    } else {
        ctx.load(offset)
    }
}

/// The transport protocol (UDP or TCP) of an IPv6 packet and its offset from the IPv6 header,
/// past up to `MAX_IPV6_EXT_HEADERS` extension headers; `None` for anything else and for a
/// fragment other than the first, which has no transport header. `next` is the fixed header's
/// next-header field, `read4` reads four bytes at an offset from the IPv6 header. Shared by the
/// socket hooks (packet memory) and the drop hook (kernel memory), so that both walk the same.
#[inline(always)]
fn ipv6_transport(
    mut next: u8,
    read4: impl Fn(usize) -> Result<[u8; 4], i64>,
) -> Result<Option<(u8, usize)>, i64> {
    let mut offset = IPV6_HDR_LEN;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        match next {
            PROTO_UDP | PROTO_TCP => break,
            // Every extension header is at least eight bytes, so four can be read.
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = read4(offset)?;
                next = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let frag = read4(offset)?;
                if (u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8) != 0 {
                    return Ok(None);
                }
                next = frag[0];
                offset += 8;
            }
            _ => return Ok(None),
        }
        i += 1;
    }
    if next != PROTO_UDP && next != PROTO_TCP {
        return Ok(None);
    }
    Ok(Some((next, offset)))
}

#[inline(always)]
fn parse_l3(ctx: &SkBuffContext) -> Result<Option<L3>, i64> {
    // cgroup_skb programs see the packet from the network header on.
    // Twenty bytes: the smallest IP header. (A one-byte bounds check compiles to a form the
    // verifier cannot use for packet ranges.)
    let hdr: [u8; 20] = read(ctx, 0)?;
    match hdr[0] >> 4 {
        4 => {
            if hdr[9] != PROTO_UDP && hdr[9] != PROTO_TCP {
                return Ok(None);
            }
            // A non-first fragment has no UDP header.
            if (u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff) != 0 {
                return Ok(None);
            }
            let ihl = ((hdr[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(-1);
            }
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr[..4].copy_from_slice(&hdr[12..16]);
            daddr[..4].copy_from_slice(&hdr[16..20]);
            Ok(Some(L3 {
                family: FAMILY_IPV4,
                proto: hdr[9],
                l4_offset: ihl,
                saddr,
                daddr,
            }))
        }
        6 => {
            let hdr: [u8; IPV6_HDR_LEN] = read(ctx, 0)?;
            let Some((next, offset)) = ipv6_transport(hdr[6], |at| read(ctx, at))? else {
                return Ok(None);
            };
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&hdr[8..24]);
            daddr.copy_from_slice(&hdr[24..40]);
            Ok(Some(L3 {
                family: FAMILY_IPV6,
                proto: next,
                l4_offset: offset,
                saddr,
                daddr,
            }))
        }
        _ => Ok(None),
    }
}

/// Whether the packet is DNS of a client: queries leave towards a DNS port (egress) and
/// responses arrive from one (ingress).
#[inline(always)]
fn watched(direction: u8, sport: u16, dport: u16) -> bool {
    if direction == DIR_EGRESS {
        dns_port(dport)
    } else {
        dns_port(sport)
    }
}

/// Whether `port` is one of `--ports`. They fill `PORT_CONFIG` from its first slot on
/// (`capture::port_config`), so the first empty slot ends the search: with the default, a packet
/// that is not DNS costs two loads here instead of eight (and the spills of the other six).
/// Each slot is read volatile, or the compiler would fold in the default it was built with.
#[inline(always)]
fn dns_port(port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORTS {
        // SAFETY: an in-bounds read of a read-only global set before load.
        let configured = unsafe { core::ptr::read_volatile(&PORT_CONFIG.ports[i]) };
        if configured == 0 {
            return false;
        }
        if configured == port {
            return true;
        }
        i += 1;
    }
    false
}

/// The byte at `offset` of a packet whose linear area was bounds-checked past it.
///
/// # Safety
/// `data + offset` must lie below `data_end`, checked so that the verifier sees it.
#[inline(always)]
unsafe fn peek(data: usize, offset: usize) -> u8 {
    // SAFETY: per the contract above.
    unsafe { *((data + offset) as *const u8) }
}

/// The common case, answered with a handful of single loads: an IPv4 packet without options
/// or an IPv6 packet without extension headers, its headers in the linear area, that is not
/// DNS. Returns `false` when the packet needs the general path (options, extension headers,
/// headers beyond the linear area, or DNS).
#[inline(always)]
fn skip_quickly(ctx: &SkBuffContext, direction: u8) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's data pointers is always allowed for cgroup_skb.
    let (data, data_end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // Twenty bytes of IPv4 header plus the four bytes of ports after a header without options.
    if data + 24 > data_end {
        return false;
    }
    // SAFETY: every offset read below is under 24, checked against data_end above, except
    // those of the IPv6 branch, which checks its own.
    unsafe {
        let b0 = peek(data, 0);
        if b0 >> 4 == 6 {
            // Forty bytes of IPv6 header, then the ports when no extension header follows.
            if data + 44 > data_end {
                return false;
            }
            let next = peek(data, 6);
            if next != PROTO_UDP && next != PROTO_TCP {
                // Extension headers (or not a transport we watch): the general path.
                return false;
            }
            let sport = u16::from_be_bytes([peek(data, 40), peek(data, 41)]);
            let dport = u16::from_be_bytes([peek(data, 42), peek(data, 43)]);
            return !watched(direction, sport, dport);
        }
        if b0 != 0x45 {
            // IPv4 with options: the general path.
            return false;
        }
        let proto = peek(data, 9);
        if proto != PROTO_UDP && proto != PROTO_TCP {
            return true;
        }
        // A non-first fragment has no transport header.
        if (u16::from_be_bytes([peek(data, 6), peek(data, 7)]) & 0x1fff) != 0 {
            return true;
        }
        let sport = u16::from_be_bytes([peek(data, 20), peek(data, 21)]);
        let dport = u16::from_be_bytes([peek(data, 22), peek(data, 23)]);
        !watched(direction, sport, dport)
    }
}

#[inline(always)]
fn try_capture(ctx: &SkBuffContext, direction: u8) -> Result<(), i64> {
    if skip_quickly(ctx, direction) {
        return Ok(());
    }
    let l3 = match parse_l3(ctx)? {
        Some(l3) => l3,
        None => return Ok(()),
    };
    // Ports sit at the same place in UDP and TCP headers.
    let ports_hdr: [u8; 4] = read(ctx, l3.l4_offset)?;
    let sport = u16::from_be_bytes([ports_hdr[0], ports_hdr[1]]);
    let dport = u16::from_be_bytes([ports_hdr[2], ports_hdr[3]]);
    if !watched(direction, sport, dport) {
        return Ok(());
    }
    match emit(ctx, direction, &l3, sport, dport) {
        Ok(()) => Ok(()),
        Err(e) => {
            bump(STAT_UNPARSEABLE);
            Err(e)
        }
    }
}

#[inline(always)]
fn emit(ctx: &SkBuffContext, direction: u8, l3: &L3, sport: u16, dport: u16) -> Result<(), i64> {
    let (payload_offset, claimed_len) = if l3.proto == PROTO_TCP {
        // Data offset: high nibble of byte 12, in 32-bit words.
        let tcp: [u8; 14] = read(ctx, l3.l4_offset)?;
        let doff = ((tcp[12] >> 4) as usize) * 4;
        if doff < 20 {
            return Err(-1);
        }
        (l3.l4_offset + doff, u32::MAX)
    } else {
        let udp: [u8; UDP_HDR_LEN] = read(ctx, l3.l4_offset)?;
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as u32;
        (
            l3.l4_offset + UDP_HDR_LEN,
            udp_len.saturating_sub(UDP_HDR_LEN as u32),
        )
    };
    // The UDP length field can lie; the skb length cannot.
    let in_skb = ctx.len().saturating_sub(payload_offset as u32);
    let msg_len = core::cmp::min(claimed_len, in_skb);
    // Bare TCP segments (handshake, ACKs, FIN) carry no DNS.
    if l3.proto == PROTO_TCP && msg_len == 0 {
        return Ok(());
    }
    let packet = Captured {
        direction,
        l3,
        sport,
        dport,
        payload_offset: payload_offset as u32,
        msg_len,
    };
    // The smallest event that holds what is copied.
    const SMALL: usize = DNS_CAPTURE_CLASSES[0];
    const MEDIUM: usize = DNS_CAPTURE_CLASSES[1];
    if msg_len <= SMALL as u32 {
        emit_sized::<SMALL>(ctx, &packet);
    } else if msg_len <= MEDIUM as u32 {
        emit_sized::<MEDIUM>(ctx, &packet);
    } else {
        emit_sized::<DNS_CAPTURE_LEN>(ctx, &packet);
    }
    Ok(())
}

/// What `emit` found out about a DNS packet.
struct Captured<'a> {
    direction: u8,
    l3: &'a L3,
    sport: u16,
    dport: u16,
    payload_offset: u32,
    msg_len: u32,
}

/// Hands a packet over in an event with room for `N` message bytes.
#[inline(always)]
fn emit_sized<const N: usize>(ctx: &SkBuffContext, packet: &Captured<'_>) {
    let Captured {
        direction,
        l3,
        sport,
        dport,
        payload_offset,
        msg_len,
    } = *packet;
    let Some(mut entry) = EVENTS.reserve::<DnsEventOf<N>>(0) else {
        bump(STAT_RINGBUF_FULL);
        bump(if direction == DIR_EGRESS {
            STAT_LOST_EGRESS
        } else {
            STAT_LOST_INGRESS
        });
        return;
    };
    let event = entry.as_mut_ptr();
    let skb = ctx.skb.skb;
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of the right
    // size; every field is written before submit.
    unsafe {
        (*event).header.ts_ns = bpf_ktime_get_ns();
        (*event).header.socket_cookie = bpf_get_socket_cookie(skb as *mut _);
        (*event).header.cgroup_id = bpf_skb_cgroup_id(skb);
        (*event).header.saddr = l3.saddr;
        (*event).header.daddr = l3.daddr;
        (*event).header.sport = sport;
        (*event).header.dport = dport;
        (*event).header.family = l3.family;
        (*event).header.direction = direction;
        (*event).header.l4_proto = l3.proto;
        (*event).header._pad0 = 0;
        (*event).header.msg_len = msg_len;
        if direction == DIR_EGRESS {
            (*event).header.pid_tgid = bpf_get_current_pid_tgid();
            (*event).header.comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
        } else {
            // Responses arrive in softirq context: the current task is unrelated.
            (*event).header.pid_tgid = 0;
            (*event).header.comm = [0u8; 16];
        }
        let mut cap = msg_len;
        if cap > N as u32 {
            cap = N as u32;
        }
        let mut copied = 0u32;
        if cap > 0 {
            // `cap` itself, N being a power of two; but written so that the verifier sees the
            // helper's length within 1..=N whatever the compiler makes of the comparisons
            // (it turns `cap > 0 && cap <= N` into one unsigned test on `cap - 1`, which the
            // verifier cannot follow back to `cap`).
            let len = ((cap - 1) & (N as u32 - 1)) + 1;
            let ret = bpf_skb_load_bytes(
                skb as *const _,
                payload_offset,
                (*event).msg.as_mut_ptr() as *mut _,
                len,
            );
            if ret == 0 {
                copied = len;
            }
        }
        (*event).header.cap_len = copied;
    }
    // What waits already counts this event: its space was taken at reserve.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let wake = if waiting >= EVENTS.query(BPF_RB_RING_SIZE as u64) / WAKEUP_FRACTION {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
    bump(STAT_EVENTS);
}

/// `trace_kfree_skb(skb, location, reason, rx_sk)`: every packet the kernel frees as dropped.
#[btf_tracepoint(function = "kfree_skb")]
pub fn dns_drop(ctx: BtfTracePointContext) -> i32 {
    let _ = try_drop(&ctx);
    0
}

/// Reads a `T` from kernel memory at `base + offset`.
#[inline(always)]
fn kread<T>(base: u64, offset: u32) -> Result<T, i64> {
    if offset == OFFSET_UNKNOWN || base == 0 {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(i64::from)
}

#[inline(always)]
fn netns_inum(offsets: &KernelOffsets, skb: u64) -> u32 {
    let net = match kread::<u64>(skb, offsets.skb_dev) {
        Ok(dev) if dev != 0 => kread::<u64>(dev, offsets.dev_net).unwrap_or(0),
        _ => match kread::<u64>(skb, offsets.skb_sk) {
            Ok(sk) if sk != 0 => kread::<u64>(sk, offsets.sk_net).unwrap_or(0),
            _ => 0,
        },
    };
    kread::<u32>(net, offsets.net_inum).unwrap_or(0)
}

#[inline(always)]
fn try_drop(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // SAFETY: plain reads of read-only globals set before load.
    let offsets = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    if offsets.valid == 0 {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let reason: u32 = ctx.arg(2);
    let head: u64 = kread(skb, offsets.skb_head)?;
    let network_header: u16 = kread(skb, offsets.skb_network_header)?;
    // 0xffff marks an unset header (the packet never got that far).
    if head == 0 || network_header == 0xffff {
        return Ok(());
    }
    let l3 = head + u64::from(network_header);
    let ip: [u8; 20] = kread(l3, 0)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let (family, proto, l4_offset, l3_end) = match ip[0] >> 4 {
        4 => {
            if (u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) != 0 {
                return Ok(());
            }
            saddr[..4].copy_from_slice(&ip[12..16]);
            daddr[..4].copy_from_slice(&ip[16..20]);
            let total = u16::from_be_bytes([ip[2], ip[3]]) as u32;
            (FAMILY_IPV4, ip[9], ((ip[0] & 0x0f) as u32) * 4, total)
        }
        6 => {
            let ip6: [u8; IPV6_HDR_LEN] = kread(l3, 0)?;
            saddr.copy_from_slice(&ip6[8..24]);
            daddr.copy_from_slice(&ip6[24..40]);
            let payload = u16::from_be_bytes([ip6[4], ip6[5]]) as u32;
            let Some((proto, l4_offset)) = ipv6_transport(ip6[6], |at| kread(l3, at as u32))?
            else {
                return Ok(());
            };
            (
                FAMILY_IPV6,
                proto,
                l4_offset as u32,
                IPV6_HDR_LEN as u32 + payload,
            )
        }
        _ => return Ok(()),
    };
    if proto != PROTO_UDP && proto != PROTO_TCP {
        return Ok(());
    }
    let l4: [u8; 16] = kread(l3, l4_offset)?;
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    if !dns_port(sport) && !dns_port(dport) {
        return Ok(());
    }
    let l4_hdr_len = if proto == PROTO_UDP {
        UDP_HDR_LEN as u32
    } else {
        ((l4[12] >> 4) as u32) * 4
    };
    let payload_offset = l4_offset + l4_hdr_len;
    let payload_len = l3_end.saturating_sub(payload_offset);
    // Bare TCP segments (handshake, ACKs, FIN) carry no DNS: their loss is TCP's business.
    if proto == PROTO_TCP && payload_len == 0 {
        return Ok(());
    }

    bump(STAT_DROPS);
    let Some(mut entry) = DROPS.reserve::<DropEvent>(0) else {
        bump(STAT_DROP_RINGBUF_FULL);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: exclusive reserved slot; every field written before submit.
    unsafe {
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).location = location;
        (*event).netns_inum = netns_inum(&offsets, skb);
        (*event).reason = reason;
        (*event).saddr = saddr;
        (*event).daddr = daddr;
        (*event).sport = sport;
        (*event).dport = dport;
        (*event).family = family;
        (*event).l4_proto = proto;
        (*event)._pad0 = [0; 2];
        (*event).payload_len = payload_len;
        let mut cap = payload_len;
        if cap > DROP_CAPTURE_LEN as u32 {
            cap = DROP_CAPTURE_LEN as u32;
        }
        let mut copied = 0;
        if cap > 0 && cap <= DROP_CAPTURE_LEN as u32 {
            let ret = probe_read_kernel_raw(
                (*event).payload.as_mut_ptr() as *mut _,
                cap,
                (l3 + u64::from(payload_offset)) as *const _,
            );
            if ret == 0 {
                copied = cap;
            }
        }
        (*event).cap_len = copied;
    }
    entry.submit(0);
    Ok(())
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
