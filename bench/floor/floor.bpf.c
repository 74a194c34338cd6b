// SPDX-License-Identifier: GPL-2.0-only
/*
 * The floor: the least an sk_msg policy can do, written by hand, for bench/http_bench.py.
 *
 * floor_sockops (cgroup sock_ops) puts every client-side TCP connection to FLOOR_PORT into the
 * sockhash floor_socks, keyed by socket cookie, when it becomes established, as sockpol's
 * sockpol_sockops does. floor_msg (sk_msg, attached to floor_socks as msg_verdict) then runs on
 * every sendmsg of those connections and makes one prefix check: it pulls the first 16 bytes of
 * the message into the data window and refuses a request line whose path starts with "/admin".
 * Everything else passes, unparsed.
 *
 * Self-contained: no vmlinux.h, no libbpf headers. The context fields, helper ids and constants
 * are those of the kernel's UAPI (include/uapi/linux/bpf.h); only the fields used are named.
 *
 *     clang -O2 -g -target bpf -DFLOOR_PORT=18080 -c floor.bpf.c -o floor.bpf.o
 */

typedef unsigned char __u8;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#ifndef FLOOR_PORT
#define FLOOR_PORT 18080
#endif

#define SEC(name) __attribute__((section(name), used))
#define __always_inline inline __attribute__((always_inline))
/* BTF-defined maps, as libbpf's bpf_helpers.h spells them. */
#define __uint(name, val) int (*name)[val]

enum {
	BPF_MAP_TYPE_SOCKHASH = 18,
	BPF_NOEXIST = 1,
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4,
	AF_INET = 2,
	AF_INET6 = 10,
	SK_DROP = 0,
	SK_PASS = 1,
};

/* UAPI struct bpf_sock_ops, up to the field used (offsets: op 0, family 20, remote_port 64). */
struct bpf_sock_ops {
	__u32 op;
	__u32 args[4];
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, in the upper 16 bits of the u32 on x86 */
	__u32 local_port;
};

/* UAPI struct sk_msg_md, up to the fields used (data 0, data_end 8). */
struct sk_msg_md {
	void *data;
	void *data_end;
};

/* Helpers by their ids in enum bpf_func_id. */
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static long (*bpf_msg_pull_data)(struct sk_msg_md *msg, __u32 start, __u32 end,
				 __u64 flags) = (void *)63;
static long (*bpf_sock_hash_update)(struct bpf_sock_ops *skops, void *map, void *key,
				    __u64 flags) = (void *)70;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__uint(key_size, sizeof(__u64));
	__uint(value_size, sizeof(__u32));
} floor_socks SEC(".maps");

SEC("sockops")
int floor_sockops(struct bpf_sock_ops *ops)
{
	__u64 cookie;

	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (ops->family != AF_INET && ops->family != AF_INET6)
		return 1;
	if (__builtin_bswap32(ops->remote_port) != FLOOR_PORT)
		return 1;
	cookie = bpf_get_socket_cookie(ops);
	bpf_sock_hash_update(ops, &floor_socks, &cookie, BPF_NOEXIST);
	return 1;
}

#define PULL 16 /* the longest method (7 bytes), a space, "/admin", with room to spare */

static __always_inline int is_admin(const __u8 *p)
{
	return p[0] == '/' && p[1] == 'a' && p[2] == 'd' && p[3] == 'm' && p[4] == 'i' &&
	       p[5] == 'n';
}

SEC("sk_msg")
int floor_msg(struct sk_msg_md *msg)
{
	const __u8 *p, *end;

	if (bpf_msg_pull_data(msg, 0, PULL, 0))
		return SK_PASS; /* shorter than PULL bytes: no request line to check */
	p = msg->data;
	end = msg->data_end;
	if (p + PULL > end)
		return SK_PASS;
	/* The path starts after the method's space (methods are 1 to 7 bytes). */
#pragma unroll
	for (int i = 1; i <= 7; i++)
		if (p[i] == ' ')
			return is_admin(p + i + 1) ? SK_DROP : SK_PASS;
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
