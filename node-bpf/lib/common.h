/* Included first by every program: kernel types from BTF (CO-RE) and libbpf's helpers. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* UAPI macros that vmlinux.h (types only) does not carry. */
#define ETH_P_IP 0x0800
#define ETH_ALEN 6
#define AF_INET 2
#define BPF_F_ZERO_CSUM_TX (1ULL << 1)

/* Packet bounds, read with a single load each: clang otherwise merges the ctx offsets of
 * several reads into one pointer, which the verifier refuses ("modified ctx ptr"). Cilium's
 * ctx_data_end() does the same. */
static __always_inline void *ctx_data(const struct __sk_buff *skb)
{
	void *data;

	asm volatile("%[data] = *(u32 *)(%[skb] + %[offset])"
		     : [data] "=r"(data)
		     : [skb] "r"(skb), [offset] "i"(__builtin_offsetof(struct __sk_buff, data)));
	return data;
}

static __always_inline void *ctx_data_end(const struct __sk_buff *skb)
{
	void *data_end;

	asm volatile("%[data_end] = *(u32 *)(%[skb] + %[offset])"
		     : [data_end] "=r"(data_end)
		     : [skb] "r"(skb), [offset] "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return data_end;
}

#endif
