//! The `sk_lookup` program, assembled at run time. It runs when the kernel looks for the
//! socket of a new TCP connection (a SYN) in fluxd's network namespace, before the listening
//! sockets are searched. In C it would read:
//!
//! ```c
//! int flux_steer(struct bpf_sk_lookup *ctx) {
//!     if (ctx->protocol != IPPROTO_TCP)
//!         return SK_PASS;                       // not ours: the usual lookup
//!     if (ctx->family == AF_INET6)
//!         return steer6(ctx);                   // the same, with the IPv6 maps (below)
//!     if (ctx->family != AF_INET)
//!         return SK_PASS;
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
//!     return steer(ctx, &socket);
//! }
//!
//! int steer(struct bpf_sk_lookup *ctx, void *socket_map) {
//!     __u32 ifindex = ctx->ingress_ifindex;     // lo, or a bridge (--bridge-interfaces)
//!     if (!bpf_map_lookup_elem(&ifaces, &ifindex))
//!         return SK_DROP;                       // from the LAN: never to the proxy
//!     __u32 zero = 0;
//!     struct bpf_sock *sk = bpf_map_lookup_elem(socket_map, &zero);
//!     if (!sk)
//!         return SK_DROP;                       // no fluxd listening: refused
//!     long err = bpf_sk_assign(ctx, sk, 0);     // a reuseport group still balances
//!     bpf_sk_release(sk);
//!     return err ? SK_DROP : SK_PASS;
//! }
//! ```
//!
//! `steer6` keys `services6` with `local_ip6` (16 bytes) and the port, `addresses6` with
//! `{ 128, local_ip6 }`, and hands the connection to `socket6`, fluxd's IPv6-only listener:
//! the kernel refuses to give an IPv6 connection to an IPv4 socket.
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
const LOCAL_IP6: i16 = 44;
const LOCAL_PORT: i16 = 60;
const INGRESS_IFINDEX: i16 = 64;

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const IPPROTO_TCP: i32 = 6;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

// Helpers (enum bpf_func_id); map lookups are `Asm::lookup`.
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;

// The stack frame: fp-4 a u32 key (ifindex, then the socket's index), fp-16 the service key,
// fp-24 the address key, fp-48 the IPv6 service key (20 bytes), fp-72 the IPv6 address key.
const U32_KEY: i16 = -4;
const SERVICE_KEY: i16 = -16;
const ADDRESS_KEY: i16 = -24;
const SERVICE6_KEY: i16 = -48;
const ADDRESS6_KEY: i16 = -72;

/// The program's instructions for `maps`.
pub(crate) fn instructions(maps: &Maps) -> Vec<u64> {
    let mut a = Asm::default();
    a.mov(R6, R1) // r6 = ctx, kept across calls
        .load32(R2, R6, PROTOCOL)
        .jne(R2, IPPROTO_TCP, "pass")
        .load32(R2, R6, FAMILY)
        .jeq(R2, AF_INET6, "v6")
        .jne(R2, AF_INET, "pass");
    // A service?
    a.load32(R2, R6, LOCAL_IP4)
        .store32(FP, SERVICE_KEY, R2)
        .load32(R2, R6, LOCAL_PORT)
        .store32(FP, SERVICE_KEY + 4, R2)
        .lookup(maps.services.as_raw_fd(), SERVICE_KEY)
        .jeq(R0, 0, "not_a_service")
        .load32(R2, R0, 0)
        .jne(R2, ACTION_PROXY as i32, "drop");
    steer(&mut a, maps, maps.socket.as_raw_fd());
    // An address flux routes here, on a port no service has?
    a.label("not_a_service")
        .store32_imm(FP, ADDRESS_KEY, 32)
        .load32(R2, R6, LOCAL_IP4)
        .store32(FP, ADDRESS_KEY + 4, R2)
        .lookup(maps.addresses.as_raw_fd(), ADDRESS_KEY)
        .jne(R0, 0, "drop")
        .ja("pass");
    // The same for IPv6, with the address in four words.
    a.label("v6");
    store_ip6(&mut a, SERVICE6_KEY);
    a.load32(R2, R6, LOCAL_PORT)
        .store32(FP, SERVICE6_KEY + 16, R2)
        .lookup(maps.services6.as_raw_fd(), SERVICE6_KEY)
        .jeq(R0, 0, "not_a_service6")
        .load32(R2, R0, 0)
        .jne(R2, ACTION_PROXY as i32, "drop");
    steer(&mut a, maps, maps.socket6.as_raw_fd());
    a.label("not_a_service6").store32_imm(FP, ADDRESS6_KEY, 128);
    store_ip6(&mut a, ADDRESS6_KEY + 4);
    a.lookup(maps.addresses6.as_raw_fd(), ADDRESS6_KEY)
        .jne(R0, 0, "drop");
    a.label("pass").mov_imm(R0, SK_PASS).exit();
    a.label("drop").mov_imm(R0, SK_DROP).exit();
    a.finish()
}

/// Copies the connection's local IPv6 address (ctx in r6) to the stack at `at`, as the four
/// words the context holds it in (network order).
fn store_ip6(a: &mut Asm, at: i16) {
    for i in 0..4 {
        a.load32(R2, R6, LOCAL_IP6 + 4 * i)
            .store32(FP, at + 4 * i, R2);
    }
}

/// A service's connection (ctx in r6) from an interface whose connections flux captures, to
/// the listener in `socket_map`; ends in a jump to `pass` or `drop`.
fn steer(a: &mut Asm, maps: &Maps, socket_map: i32) {
    a.load32(R2, R6, INGRESS_IFINDEX)
        .store32(FP, U32_KEY, R2)
        .lookup(maps.ifaces.as_raw_fd(), U32_KEY)
        .jeq(R0, 0, "drop");
    a.store32_imm(FP, U32_KEY, 0)
        .lookup(socket_map, U32_KEY)
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
}
