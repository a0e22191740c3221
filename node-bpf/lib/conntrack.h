/* Connection tracking: every connection the datapath lets through is remembered by its forward
 * tuple. A packet whose reversed tuple is known is a reply and passes without a policy check;
 * forward packets are checked every time, so a connection a new policy denies stops at once. */
#ifndef WEFT_CONNTRACK_H
#define WEFT_CONNTRACK_H

#include "common.h"

struct ct_key {
	__u32 src_ip; /* network byte order */
	__u32 dst_ip;
	__u16 src_port; /* host byte order; 0 when not TCP/UDP */
	__u16 dst_port;
	__u8 protocol;
	__u8 pad[3];
};

struct ct_entry {
	__u64 last_seen_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

static __always_inline int ct_is_reply(__u32 src, __u32 dst, __u16 sport, __u16 dport, __u8 proto)
{
	struct ct_key reverse = {
		.src_ip = dst, .dst_ip = src, .src_port = dport, .dst_port = sport, .protocol = proto,
	};

	return bpf_map_lookup_elem(&conntrack, &reverse) != NULL;
}

static __always_inline void ct_remember(__u32 src, __u32 dst, __u16 sport, __u16 dport, __u8 proto,
					__u64 now)
{
	struct ct_key forward = {
		.src_ip = src, .dst_ip = dst, .src_port = sport, .dst_port = dport, .protocol = proto,
	};
	struct ct_entry *entry = bpf_map_lookup_elem(&conntrack, &forward);
	struct ct_entry fresh = { .last_seen_ns = now };

	if (entry)
		entry->last_seen_ns = now;
	else
		bpf_map_update_elem(&conntrack, &forward, &fresh, BPF_ANY);
}

#endif
