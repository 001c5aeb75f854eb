//! The `sk_lookup` program, assembled at run time. It runs when the kernel looks for the
//! socket of a new TCP connection (a SYN) in fluxd's network namespace, before the listening
//! sockets are searched. In C it would read:
//!
//! ```c
//! int flux_steer(struct bpf_sk_lookup *ctx) {
//!     if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
//!         return SK_PASS;                       // not ours: the usual lookup
//!     struct vip key = { ctx->local_ip4, ctx->local_port };
//!     __u32 *action = bpf_map_lookup_elem(&services, &key);
//!     if (!action) {
//!         struct lpm key = { 32, ctx->local_ip4 };
//!         // A VIP address (a range, or the /32 of a VIP) but no service on this port: refused,
//!         // so that no wildcard listener of the host answers for a VIP.
//!         return bpf_map_lookup_elem(&addresses, &key) ? SK_DROP : SK_PASS;
//!     }
//!     if (*action != ACTION_PROXY)
//!         return SK_DROP;                       // a service with no instance: RST at once
//!     __u32 ifindex = ctx->ingress_ifindex;     // lo, or a bridge (--bridge-interfaces)
//!     if (!bpf_map_lookup_elem(&ifaces, &ifindex))
//!         return SK_DROP;                       // from the LAN: never to the proxy
//!     __u32 zero = 0;
//!     struct bpf_sock *sk = bpf_map_lookup_elem(&socket, &zero);
//!     if (!sk)
//!         return SK_DROP;                       // no fluxd listening: refused
//!     long err = bpf_sk_assign(ctx, sk, 0);     // a reuseport group still balances
//!     bpf_sk_release(sk);
//!     return err ? SK_DROP : SK_PASS;
//! }
//! ```
//!
//! `SK_DROP` makes the lookup find no socket, so the kernel answers the SYN with a RST: the
//! client's `connect()` fails at once with `ECONNREFUSED`.

use std::os::fd::AsRawFd;

use crate::asm::{Asm, FP, R0, R1, R2, R3, R6, R7, R8};
use crate::maps::{Maps, ACTION_PROXY};

// Offsets in struct bpf_sk_lookup (linux/bpf.h).
const FAMILY: i16 = 8;
const PROTOCOL: i16 = 12;
const LOCAL_IP4: i16 = 40;
const LOCAL_PORT: i16 = 60;
const INGRESS_IFINDEX: i16 = 64;

const AF_INET: i32 = 2;
const IPPROTO_TCP: i32 = 6;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

// Helpers (enum bpf_func_id).
const MAP_LOOKUP_ELEM: i32 = 1;
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;

// The stack frame: fp-4 a u32 key (ifindex, then the socket's index), fp-16 the service key,
// fp-24 the address key.
const U32_KEY: i16 = -4;
const SERVICE_KEY: i16 = -16;
const ADDRESS_KEY: i16 = -24;

/// The program's instructions for `maps`.
pub(crate) fn instructions(maps: &Maps) -> Vec<u64> {
    let mut a = Asm::default();
    a.mov(R6, R1) // r6 = ctx, kept across calls
        .load32(R2, R6, FAMILY)
        .jne(R2, AF_INET, "pass")
        .load32(R2, R6, PROTOCOL)
        .jne(R2, IPPROTO_TCP, "pass");
    // A service?
    a.load32(R2, R6, LOCAL_IP4)
        .store32(FP, SERVICE_KEY, R2)
        .load32(R2, R6, LOCAL_PORT)
        .store32(FP, SERVICE_KEY + 4, R2)
        .load_map(R1, maps.services.as_raw_fd())
        .mov(R2, FP)
        .add_imm(R2, i32::from(SERVICE_KEY))
        .call(MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "not_a_service")
        .load32(R2, R0, 0)
        .jne(R2, ACTION_PROXY as i32, "drop");
    // From an interface whose connections flux captures?
    a.load32(R2, R6, INGRESS_IFINDEX)
        .store32(FP, U32_KEY, R2)
        .load_map(R1, maps.ifaces.as_raw_fd())
        .mov(R2, FP)
        .add_imm(R2, i32::from(U32_KEY))
        .call(MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "drop");
    // To fluxd's listening socket.
    a.store32_imm(FP, U32_KEY, 0)
        .load_map(R1, maps.socket.as_raw_fd())
        .mov(R2, FP)
        .add_imm(R2, i32::from(U32_KEY))
        .call(MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "drop")
        .mov(R7, R0)
        .mov(R1, R6)
        .mov(R2, R7)
        .mov_imm(R3, 0)
        .call(SK_ASSIGN)
        .mov(R8, R0)
        .mov(R1, R7)
        .call(SK_RELEASE)
        .jne(R8, 0, "drop")
        .ja("pass");
    // An address flux routes here, on a port no service has?
    a.label("not_a_service")
        .store32_imm(FP, ADDRESS_KEY, 32)
        .load32(R2, R6, LOCAL_IP4)
        .store32(FP, ADDRESS_KEY + 4, R2)
        .load_map(R1, maps.addresses.as_raw_fd())
        .mov(R2, FP)
        .add_imm(R2, i32::from(ADDRESS_KEY))
        .call(MAP_LOOKUP_ELEM)
        .jne(R0, 0, "drop");
    a.label("pass").mov_imm(R0, SK_PASS).exit();
    a.label("drop").mov_imm(R0, SK_DROP).exit();
    a.finish()
}
