/* Endpoints on this node, by IPv4 address: where to deliver a packet for a local pod.
 * Userspace mirror: node-bpf/src/maps.rs (EndpointKey, EndpointInfo). */
#ifndef WEFT_ENDPOINTS_H
#define WEFT_ENDPOINTS_H

#include "common.h"

struct endpoint_key {
	__u32 ip; /* network byte order */
};

struct endpoint_info {
	__u32 ifindex;      /* host-side veth */
	__u32 identity;     /* security identity */
	__u8 mac[ETH_ALEN]; /* the pod's eth0 */
	__u8 node_mac[ETH_ALEN]; /* the host-side veth, the pod's gateway */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

static __always_inline struct endpoint_info *lookup_endpoint(__u32 ip)
{
	struct endpoint_key key = { .ip = ip };

	return bpf_map_lookup_elem(&endpoints, &key);
}

#endif
