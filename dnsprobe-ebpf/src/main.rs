//! Kernel programs of dnsprobe: `cgroup_skb` ingress and egress hooks that copy DNS packets of
//! every socket on the machine into a ring buffer. Parsing happens in userspace; here we only
//! find the UDP header, decide whether the packet is DNS, and copy a bounded prefix of it.
// Host builds (clippy on the whole workspace) link std through feature unification, so the
// freestanding attributes and the panic handler apply to the BPF target only.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, map},
    maps::{PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use dnsprobe_common::{
    DnsEvent, PortConfig, DIR_EGRESS, DIR_INGRESS, DNS_CAPTURE_LEN, FAMILY_IPV4, FAMILY_IPV6,
    PROTO_UDP, STAT_COUNT, STAT_EVENTS, STAT_RINGBUF_FULL, STAT_UNPARSEABLE,
};

/// Overwritten by userspace at load time (`--ports`); read-only to the programs.
#[no_mangle]
static PORT_CONFIG: PortConfig = PortConfig::DEFAULT;

/// Resized by userspace at load time (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

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

#[inline(always)]
fn parse_l3(ctx: &SkBuffContext) -> Result<Option<L3>, i64> {
    // cgroup_skb programs see the packet from the network header on.
    // Twenty bytes: the smallest IP header. (A one-byte bounds check compiles to a form the
    // verifier cannot use for packet ranges.)
    let hdr: [u8; 20] = read(ctx, 0)?;
    match hdr[0] >> 4 {
        4 => {
            if hdr[9] != PROTO_UDP {
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
                l4_offset: ihl,
                saddr,
                daddr,
            }))
        }
        6 => {
            let hdr: [u8; IPV6_HDR_LEN] = read(ctx, 0)?;
            let mut next = hdr[6];
            let mut offset = IPV6_HDR_LEN;
            let mut i = 0;
            while i < MAX_IPV6_EXT_HEADERS {
                match next {
                    PROTO_UDP => break,
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        let ext: [u8; 2] = read(ctx, offset)?;
                        next = ext[0];
                        offset += (ext[1] as usize + 1) * 8;
                    }
                    IPPROTO_FRAGMENT => {
                        let frag: [u8; 4] = read(ctx, offset)?;
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
            if next != PROTO_UDP {
                return Ok(None);
            }
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&hdr[8..24]);
            daddr.copy_from_slice(&hdr[24..40]);
            Ok(Some(L3 {
                family: FAMILY_IPV6,
                l4_offset: offset,
                saddr,
                daddr,
            }))
        }
        _ => Ok(None),
    }
}

#[inline(always)]
fn try_capture(ctx: &SkBuffContext, direction: u8) -> Result<(), i64> {
    let l3 = match parse_l3(ctx)? {
        Some(l3) => l3,
        None => return Ok(()),
    };
    let udp: [u8; UDP_HDR_LEN] = read(ctx, l3.l4_offset)?;
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    // SAFETY: a plain read of a read-only global set before load.
    let ports = unsafe { core::ptr::read_volatile(&PORT_CONFIG) };
    // Client side only: queries leave towards a DNS port, responses arrive from one.
    let watched = if direction == DIR_EGRESS {
        ports.contains(dport)
    } else {
        ports.contains(sport)
    };
    if !watched {
        return Ok(());
    }
    match emit(ctx, direction, &l3, sport, dport, &udp) {
        Ok(()) => Ok(()),
        Err(e) => {
            bump(STAT_UNPARSEABLE);
            Err(e)
        }
    }
}

#[inline(always)]
fn emit(
    ctx: &SkBuffContext,
    direction: u8,
    l3: &L3,
    sport: u16,
    dport: u16,
    udp: &[u8; UDP_HDR_LEN],
) -> Result<(), i64> {
    let payload_offset = l3.l4_offset + UDP_HDR_LEN;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as u32;
    // The UDP length field can lie; the skb length cannot.
    let in_skb = ctx.len().saturating_sub(payload_offset as u32);
    let msg_len = core::cmp::min(udp_len.saturating_sub(UDP_HDR_LEN as u32), in_skb);

    let Some(mut entry) = EVENTS.reserve::<DnsEvent>(0) else {
        bump(STAT_RINGBUF_FULL);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let skb = ctx.skb.skb;
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of the right
    // size; every field is written before submit.
    unsafe {
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).socket_cookie = bpf_get_socket_cookie(skb as *mut _);
        (*event).cgroup_id = bpf_skb_cgroup_id(skb);
        (*event).saddr = l3.saddr;
        (*event).daddr = l3.daddr;
        (*event).sport = sport;
        (*event).dport = dport;
        (*event).family = l3.family;
        (*event).direction = direction;
        (*event).l4_proto = PROTO_UDP;
        (*event)._pad0 = 0;
        (*event).msg_len = msg_len;
        if direction == DIR_EGRESS {
            (*event).pid_tgid = bpf_get_current_pid_tgid();
            (*event).comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
        } else {
            // Responses arrive in softirq context: the current task is unrelated.
            (*event).pid_tgid = 0;
            (*event).comm = [0u8; 16];
        }
        let mut cap = msg_len;
        if cap > DNS_CAPTURE_LEN as u32 {
            cap = DNS_CAPTURE_LEN as u32;
        }
        let mut copied = 0u32;
        if cap > 0 && cap <= DNS_CAPTURE_LEN as u32 {
            let ret = bpf_skb_load_bytes(
                skb as *const _,
                payload_offset as u32,
                (*event).msg.as_mut_ptr() as *mut _,
                cap,
            );
            if ret == 0 {
                copied = cap;
            }
        }
        (*event).cap_len = copied;
    }
    entry.submit(0);
    bump(STAT_EVENTS);
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
