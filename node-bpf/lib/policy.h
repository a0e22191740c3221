/* Policy as the agent compiles it (weft-core policy::compile): a peer set per identity, and per
 * endpoint disjoint port intervals as LPM prefixes with allow and deny peer sets. A verdict is
 * two lookups and an AND. Userspace mirror: node-bpf/src/maps.rs (PeerSet, PolicyKey,
 * PolicyEntry, EndpointPolicy). */
#ifndef WEFT_POLICY_H
#define WEFT_POLICY_H

#include "common.h"

#define PEER_SET_WORDS 16 /* 1,024 peer selectors */

enum policy_direction {
	POLICY_INGRESS = 0,
	POLICY_EGRESS = 1,
};

/* Protocol numbers in policy keys; anything but TCP and UDP is POLICY_PROTO_OTHER, port 0. */
#define POLICY_PROTO_OTHER 0

struct peer_set {
	__u64 words[PEER_SET_WORDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* identity */
	__type(value, struct peer_set);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_peer_sets SEC(".maps");

struct policy_key {
	__u32 prefixlen; /* 48 fixed bits (endpoint, direction, protocol) + port prefix bits */
	__u32 endpoint;  /* the endpoint's host-side veth ifindex */
	__u8 direction;
	__u8 protocol;
	__u16 port; /* network byte order, so the trie compares its high bits first */
};

struct policy_entry {
	struct peer_set allow;
	struct peer_set deny;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_entries SEC(".maps");

/* Every endpoint whose identity is resolved has one; an endpoint without one is not ready yet
 * (CNI ADD has not returned) and may do only what an initialising endpoint needs. */
struct endpoint_policy {
	__u8 isolated_ingress;
	__u8 isolated_egress;
	__u8 unselected; /* no policy selects it: nothing isolated, no lookups needed */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32); /* host-side veth ifindex */
	__type(value, struct endpoint_policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoint_policies SEC(".maps");

static __always_inline __u8 policy_protocol(__u8 ip_protocol)
{
	return (ip_protocol == 6 || ip_protocol == 17) ? ip_protocol : POLICY_PROTO_OTHER;
}

/* The endpoint's policy state; NULL while it is not ready (see struct endpoint_policy). */
static __always_inline struct endpoint_policy *endpoint_policy_of(__u32 endpoint)
{
	return bpf_map_lookup_elem(&endpoint_policies, &endpoint);
}

/* Whether an endpoint with policy `state` may not exchange this packet with a peer of
 * `peer_identity`. */
static __always_inline int policy_denies(struct endpoint_policy *state, __u32 endpoint,
					 __u8 direction, __u32 peer_identity, __u8 ip_protocol,
					 __u16 port)
{
	struct policy_key key = {};
	struct policy_entry *entry;
	struct peer_set *peers;
	__u8 protocol;
	int i;

	protocol = policy_protocol(ip_protocol);
	key.prefixlen = 64;
	key.endpoint = endpoint;
	key.direction = direction;
	key.protocol = protocol;
	key.port = protocol == POLICY_PROTO_OTHER ? 0 : bpf_htons(port);
	entry = bpf_map_lookup_elem(&policy_entries, &key);
	peers = bpf_map_lookup_elem(&policy_peer_sets, &peer_identity);
	if (entry && peers) {
#pragma unroll
		for (i = 0; i < PEER_SET_WORDS; i++)
			if (peers->words[i] & entry->deny.words[i])
				return 1;
#pragma unroll
		for (i = 0; i < PEER_SET_WORDS; i++)
			if (peers->words[i] & entry->allow.words[i])
				return 0;
	}
	return direction == POLICY_INGRESS ? state->isolated_ingress : state->isolated_egress;
}

#endif
