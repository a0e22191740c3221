/* What the node knows about every address: its identity and, for pods on other nodes, the node
 * to send them to. Longest-prefix match, so pod CIDRs and single pods coexist.
 * Userspace mirror: node-bpf/src/maps.rs (IpcacheKey, IpcacheEntry). */
#ifndef WEFT_IPCACHE_H
#define WEFT_IPCACHE_H

#include "common.h"

struct ipcache_key {
	__u32 prefixlen; /* LPM trie keys start with the prefix length */
	__u32 ip;        /* network byte order */
};

struct ipcache_entry {
	__u32 identity;
	__u32 tunnel_endpoint; /* node IPv4 (network byte order) behind which the address lives; 0: none */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

static __always_inline struct ipcache_entry *lookup_ipcache(__u32 ip)
{
	struct ipcache_key key = { .prefixlen = 32, .ip = ip };

	return bpf_map_lookup_elem(&ipcache, &key);
}

#endif
