/* Packet and byte counters per endpoint and direction. Userspace mirror:
 * node-bpf/src/maps.rs (EndpointCounterKey, TrafficCounters); a test checks both layouts
 * against this object's BTF. */
#ifndef WEFT_COUNTERS_H
#define WEFT_COUNTERS_H

#include "common.h"

/* Directions are seen from the endpoint (the pod), not from the host veth the program sits on. */
enum endpoint_direction {
	DIRECTION_FROM_ENDPOINT = 0, /* sent by the pod: ingress of its host-side veth */
	DIRECTION_TO_ENDPOINT = 1,   /* delivered to the pod: egress of its host-side veth */
};

struct endpoint_counter_key {
	__u32 ifindex;   /* host-side veth of the endpoint */
	__u32 direction; /* enum endpoint_direction */
};

struct traffic_counters {
	__u64 packets;
	__u64 bytes; /* L2 bytes, Ethernet header included */
};

/* Per-CPU, so the hot path never takes an atomic; userspace sums the CPUs. A node runs a few
 * hundred endpoints at most, two keys each. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct endpoint_counter_key);
	__type(value, struct traffic_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoint_counters SEC(".maps");

static __always_inline void count_packet(__u32 ifindex, __u32 direction, __u32 len)
{
	struct endpoint_counter_key key = { .ifindex = ifindex, .direction = direction };
	struct traffic_counters *counters;
	struct traffic_counters first = { .packets = 1, .bytes = len };

	counters = bpf_map_lookup_elem(&endpoint_counters, &key);
	if (counters) {
		counters->packets++;
		counters->bytes += len;
		return;
	}
	/* Another CPU may create the entry between our lookup and this insert: then count into
	 * the entry it made instead of losing the packet. A full map loses the count, never the
	 * packet. */
	if (bpf_map_update_elem(&endpoint_counters, &key, &first, BPF_NOEXIST) == 0)
		return;
	counters = bpf_map_lookup_elem(&endpoint_counters, &key);
	if (counters) {
		counters->packets++;
		counters->bytes += len;
	}
}

#endif
