/* Flow events for the agent's observer. Userspace mirror: node-bpf/src/maps.rs (FlowEvent,
 * DropReason, ObservationPoint). Reported, not every packet: TCP when SYN, FIN or RST is set;
 * other protocols at most once per flow per FLOW_REPORT_INTERVAL_NS; drops always. */
#ifndef WEFT_FLOWS_H
#define WEFT_FLOWS_H

#include "common.h"

#define IPPROTO_TCP_NUM 6
#define IPPROTO_UDP_NUM 17
#define FLOW_REPORT_INTERVAL_NS (5ULL * 1000 * 1000 * 1000)

enum flow_verdict {
	VERDICT_FORWARDED = 1,
	VERDICT_DROPPED = 2,
};

enum observation_point {
	OBS_FROM_ENDPOINT = 1, /* sent by a local pod */
	OBS_TO_ENDPOINT = 2,   /* delivered to a local pod */
	OBS_TO_OVERLAY = 3,    /* handed to the VXLAN device */
	OBS_FROM_NETWORK = 4,  /* arrived at the node from the network */
};

/* Numbered like Cilium's drop reasons: stable, shared with userspace, named in every flow. */
enum drop_reason {
	DROP_NONE = 0,
	DROP_REWRITE_FAILED = 1,     /* could not rewrite the Ethernet header */
	DROP_TUNNEL_KEY_FAILED = 2,  /* could not set the VXLAN tunnel key */
	DROP_NO_TUNNEL_ENDPOINT = 3, /* routed to the tunnel, but no node owns the address */
	DROP_NOT_IPV4 = 4,           /* not IPv4 where only IPv4 is carried */
	DROP_POLICY_DENIED = 5,      /* a policy denied it (the agent names the rule) */
	DROP_NO_SERVICE_BACKEND = 6, /* sent to a service that has no backend for new connections */
	DROP_SERVICE_NAT_FAILED = 7, /* service translation failed (rewrite, or SNAT ports exhausted) */
	DROP_SOURCE_SPOOFED = 8,     /* a pod sent with an IPv4 or MAC source that is not its own */
	DROP_ENDPOINT_NOT_READY = 9, /* the endpoint's identity or policy is not in place yet */
};

struct flow_event {
	__u64 timestamp_ns; /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u32 src_ip;       /* network byte order */
	__u32 dst_ip;
	__u16 src_port; /* host byte order; 0 when not TCP/UDP */
	__u16 dst_port;
	__u32 ifindex;
	__u32 length;
	__u8 protocol;
	__u8 verdict;
	__u8 drop_reason;
	__u8 tcp_flags;
	__u8 observation_point;
	__u8 pad[3];
};

/* Ring buffer records carry no type in BTF; this unused pointer puts struct flow_event there so
 * the userspace mirror's layout can be checked against it. */
struct flow_event *flow_event_btf_anchor __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flow_events SEC(".maps");

struct flow_key {
	__u32 src_ip;
	__u32 dst_ip;
	__u16 src_port;
	__u16 dst_port;
	__u8 protocol;
	__u8 observation_point;
	__u8 pad[2];
};

/* When each non-TCP flow was last reported. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flow_last_reported SEC(".maps");

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

#define IP_MF 0x2000     /* more fragments follow */
#define IP_OFFSET 0x1FFF /* fragment offset, in 8-byte units */

/* Ports of fragmented datagrams, recorded from their first fragment: the others carry no L4
 * header, and what lies where it would be is payload, never to be read as ports. */
struct frag_key {
	__u32 src_ip;
	__u32 dst_ip;
	__u16 id; /* the IP identification shared by a datagram's fragments */
	__u8 protocol;
	__u8 pad;
};

struct frag_ports {
	__u16 src_port; /* host byte order */
	__u16 dst_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");

/* Ports and TCP flags of a packet, as policy and connection tracking see them. */
struct l4_info {
	__u16 sport; /* host byte order; 0 when not TCP/UDP */
	__u16 dport;
	__u8 tcp_flags;
};

static __always_inline int is_later_fragment(struct iphdr *ip)
{
	return (ip->frag_off & bpf_htons(IP_OFFSET)) != 0;
}

/* Reads ports and TCP flags behind an IPv4 header; zeros when absent, truncated, or not there
 * (a fragment after the first). */
static __always_inline void read_l4(struct __sk_buff *skb, struct iphdr *ip, struct flow_event *ev)
{
	void *data_end = ctx_data_end(skb);
	void *l4 = (void *)ip + ((__u32)ip->ihl * 4);

	if (is_later_fragment(ip))
		return;
	if (ip->protocol == IPPROTO_TCP_NUM) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return;
		ev->src_port = bpf_ntohs(tcp->source);
		ev->dst_port = bpf_ntohs(tcp->dest);
		/* Byte 13 of the TCP header holds CWR ECE URG ACK PSH RST SYN FIN. */
		ev->tcp_flags = ((__u8 *)tcp)[13];
	} else if (ip->protocol == IPPROTO_UDP_NUM) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return;
		ev->src_port = bpf_ntohs(udp->source);
		ev->dst_port = bpf_ntohs(udp->dest);
	}
}

/* The packet's ports and flags. A fragmented datagram's later fragments get the ports its first
 * fragment carried (as Cilium's fragment map does); without a first fragment seen they have
 * none (port 0), which a port-based allow does not match. */
static __always_inline void packet_l4(struct __sk_buff *skb, struct iphdr *ip, struct l4_info *l4)
{
	struct flow_event ev = {};
	struct frag_key key = {};
	struct frag_ports *known;

	read_l4(skb, ip, &ev);
	l4->sport = ev.src_port;
	l4->dport = ev.dst_port;
	l4->tcp_flags = ev.tcp_flags;
	if (!(ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return; /* not fragmented: the common case, no lookup */
	key.src_ip = ip->saddr;
	key.dst_ip = ip->daddr;
	key.id = ip->id;
	key.protocol = ip->protocol;
	if (!is_later_fragment(ip)) {
		struct frag_ports ports = { .src_port = ev.src_port, .dst_port = ev.dst_port };

		bpf_map_update_elem(&fragments, &key, &ports, BPF_ANY);
		return;
	}
	known = bpf_map_lookup_elem(&fragments, &key);
	if (known) {
		l4->sport = known->src_port;
		l4->dport = known->dst_port;
	}
}

static __always_inline int worth_reporting(struct flow_event *ev)
{
	struct flow_key key = {};
	__u64 *last;

	if (ev->verdict == VERDICT_DROPPED)
		return 1;
	if (ev->protocol == IPPROTO_TCP_NUM)
		return ev->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST);
	key.src_ip = ev->src_ip;
	key.dst_ip = ev->dst_ip;
	key.src_port = ev->src_port;
	key.dst_port = ev->dst_port;
	key.protocol = ev->protocol;
	key.observation_point = ev->observation_point;
	last = bpf_map_lookup_elem(&flow_last_reported, &key);
	if (last && ev->timestamp_ns - *last < FLOW_REPORT_INTERVAL_NS)
		return 0;
	bpf_map_update_elem(&flow_last_reported, &key, &ev->timestamp_ns, BPF_ANY);
	return 1;
}

/* Reports what happened to an IPv4 packet at this observation point, if it is worth it. */
static __always_inline void report_flow(struct __sk_buff *skb, struct iphdr *ip, __u32 ifindex,
					__u8 observation_point, __u8 verdict, __u8 drop_reason)
{
	struct flow_event ev = {};

	ev.timestamp_ns = bpf_ktime_get_ns();
	ev.src_ip = ip->saddr;
	ev.dst_ip = ip->daddr;
	ev.protocol = ip->protocol;
	ev.ifindex = ifindex;
	ev.length = skb->len;
	ev.verdict = verdict;
	ev.drop_reason = drop_reason;
	ev.observation_point = observation_point;
	read_l4(skb, ip, &ev);
	if (worth_reporting(&ev))
		bpf_ringbuf_output(&flow_events, &ev, sizeof(ev), 0);
}

#endif
