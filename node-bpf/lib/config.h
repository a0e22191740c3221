/* Per-node settings the agent writes once at start. Userspace mirror: NodeConfig. */
#ifndef WEFT_CONFIG_H
#define WEFT_CONFIG_H

#include "common.h"

enum routing_mode {
	ROUTING_NATIVE = 0, /* the network routes pod CIDRs to nodes */
	ROUTING_TUNNEL = 1, /* pod traffic between nodes is VXLAN-encapsulated */
};

struct node_config {
	__u32 routing_mode;  /* enum routing_mode */
	__u32 tunnel_ifindex; /* the node's VXLAN device (tunnel mode) */
	__u32 node_ip;        /* network byte order */
	__u32 cluster_id;
	__u32 maglev_table_size; /* slots of every Maglev table (prime) */
	__u32 lb_hash_seed;      /* the same on every node, so every node picks the same backend */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config SEC(".maps");

/* Every IPv4 address of the node beyond node_ip (secondary addresses, other NICs), kept current
 * by the agent (node-agent/src/node_addresses.rs): NodePorts answer on each. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);  /* network byte order */
	__type(value, __u8); /* unused */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_addresses SEC(".maps");

/* The layout fingerprint (node-bpf/build.rs) of every pinned map, recorded by the agent after
 * it loads the programs: a later agent recreates a map whose recorded layout is not its own,
 * even when the sizes match. Programs never read it. */
struct map_layout_key {
	char name[64]; /* the map's (pin) name, zero-padded */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct map_layout_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} map_layouts SEC(".maps");

static __always_inline struct node_config *get_node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&node_config, &zero);
}

#endif
