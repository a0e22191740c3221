/* Delivery decisions shared by the pod and host programs. */
#ifndef WEFT_FORWARD_H
#define WEFT_FORWARD_H

#include "common.h"
#include "config.h"
#include "counters.h"
#include "endpoints.h"
#include "conntrack.h"
#include "flows.h"
#include "policy.h"
#include "ipcache.h"
#include "lb.h"

/* The IPv4 header of an Ethernet frame, or NULL when it is not IPv4 or is truncated. */
static __always_inline struct iphdr *ipv4_header(struct __sk_buff *skb)
{
	void *data = ctx_data(skb);
	void *data_end = ctx_data_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end)
		return NULL;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4)
		return NULL;
	return ip;
}

/* The endpoint that sent a packet into its host-side veth `ifindex`, when the packet
 * carries that endpoint's own IPv4 and MAC source; NULL otherwise. Everything downstream (the
 * receiver's policy, the tunnel's identity) trusts the source address, so a pod that could
 * send with another pod's address would inherit that pod's identity. A pod the agent has not
 * registered yet has no entry either: it sends nothing until it is wired. */
static __always_inline struct endpoint_info *validated_sender(__u32 ifindex, struct iphdr *ip)
{
	struct endpoint_info *ep = lookup_endpoint(ip->saddr);
	struct ethhdr *eth = (void *)ip - sizeof(struct ethhdr);
	int i;

	if (!ep || ep->ifindex != ifindex)
		return NULL;
#pragma unroll
	for (i = 0; i < ETH_ALEN; i++)
		if (eth->h_source[i] != ep->mac[i])
			return NULL;
	return ep;
}

#define IDENTITY_HOST 1 /* reserved: the local node */
#define DNS_PORT 53

/* What an endpoint may exchange before its identity and policy are in place (Cilium's
 * reserved:init): traffic with its own node (kubelet probes, the node's agents) and DNS
 * lookups. Everything else waits until CNI ADD has put its policy in the maps. */
static __always_inline int init_endpoint_may(__u8 direction, __u32 peer, __u8 ip_protocol,
					     __u16 dport)
{
	if (peer == IDENTITY_HOST)
		return 1;
	return direction == POLICY_EGRESS && dport == DNS_PORT &&
	       (ip_protocol == IPPROTO_TCP_NUM || ip_protocol == IPPROTO_UDP_NUM);
}

/* The ipcache entry `enforce` looked up for the peer, so forwarding does not look it up again. */
struct peer_lookup {
	struct ipcache_entry *entry; /* NULL: the address is in no entry */
	__u8 done;                   /* 0: not looked up (a reply, a known peer, no policy) */
};

#define ICMP_PARAMETER_PROBLEM 12

/* Whether a packet is an ICMP error (destination unreachable — "fragmentation needed"
 * among them —, time exceeded, parameter problem) about a packet of a live connection: the
 * error quotes the packet it is about, and the quoted packet's connection vouches for it, as
 * Linux conntrack's RELATED and Cilium do. So a pod that policy isolates still learns its path
 * MTU, or that a peer's port is closed, for the connections it has; an error about nothing it
 * has is judged by policy like other ICMP. Returns -1 when the packet is no ICMP error, 0 when
 * it is one no live connection vouches for, 1 when it is related. Only the quoted connection
 * is looked up: the error is never a connection of its own. */
static __always_inline int icmp_error_related(struct __sk_buff *skb, struct iphdr *ip, __u64 now)
{
	void *data_end = ctx_data_end(skb);
	__u8 *icmp = (void *)(ip + 1);
	struct ct_lookup quoted = {};
	struct iphdr inner;
	__u16 ports[2];

	if (ip->protocol != LB_PROTO_ICMP || ip->ihl != 5 || (void *)(icmp + 1) > data_end)
		return -1;
	if (icmp[0] != LB_ICMP_DEST_UNREACH && icmp[0] != LB_ICMP_TIME_EXCEEDED &&
	    icmp[0] != ICMP_PARAMETER_PROBLEM)
		return -1;
	/* The quote must be a TCP or UDP packet sent by the error's addressee. */
	if (bpf_skb_load_bytes(skb, LB_ICMP_INNER_IP_OFFSET, &inner, sizeof(inner)) < 0 ||
	    inner.ihl != 5 || inner.saddr != ip->daddr ||
	    (inner.protocol != LB_PROTO_TCP && inner.protocol != LB_PROTO_UDP) ||
	    bpf_skb_load_bytes(skb, LB_ICMP_INNER_L4_OFFSET, ports, sizeof(ports)) < 0)
		return 0;
	ct_verdict(inner.saddr, inner.daddr, bpf_ntohs(ports[0]), bpf_ntohs(ports[1]),
		   inner.protocol, 0, now, &quoted);
	return quoted.entry ? 1 : 0;
}

/* Applies `endpoint`'s policy in `direction` to a packet, remembering allowed connections.
 * `known_peer` is the peer's identity when the packet itself vouches for it (a validated
 * local sender, the tunnel's VNI); 0 derives it from the peer's address. Returns 1 when the
 * packet must be dropped (and reports it). */
static __always_inline int enforce(struct __sk_buff *skb, struct iphdr *ip, __u32 endpoint,
				   __u8 direction, __u8 observation_point, __u32 known_peer,
				   struct peer_lookup *lookup)
{
	struct endpoint_policy *state;
	struct ct_lookup ct = {};
	struct l4_info l4 = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 peer;
	int verdict;
	int icmp_error = icmp_error_related(skb, ip, now);

	if (icmp_error == 1)
		return 0;
	packet_l4(skb, ip, &l4);
	if (icmp_error < 0) {
		verdict = ct_verdict(ip->saddr, ip->daddr, l4.sport, l4.dport, ip->protocol,
				     l4.tcp_flags, now, &ct);
		if (verdict == CT_REPLY)
			goto allowed;
	}
	state = endpoint_policy_of(endpoint);
	/* Endpoints no policy selects skip the identity and policy lookups; their connections
	 * are still tracked, so replies pass once a policy isolates them. */
	if (state && state->unselected)
		goto allowed;
	if (known_peer) {
		peer = known_peer;
	} else {
		struct ipcache_entry *entry =
			lookup_ipcache(direction == POLICY_EGRESS ? ip->daddr : ip->saddr);

		/* Addresses the node knows nothing of are the world (reserved identity 2). */
		peer = entry ? entry->identity : 2;
		if (lookup) {
			lookup->entry = entry;
			lookup->done = 1;
		}
	}
	if (!state) {
		if (init_endpoint_may(direction, peer, ip->protocol, l4.dport))
			goto allowed;
		report_flow(skb, ip, endpoint, observation_point, VERDICT_DROPPED,
			    DROP_ENDPOINT_NOT_READY);
		return 1;
	}
	if (policy_denies(state, endpoint, direction, peer, ip->protocol, l4.dport)) {
		report_flow(skb, ip, endpoint, observation_point, VERDICT_DROPPED, DROP_POLICY_DENIED);
		return 1;
	}
allowed:
	/* An ICMP error opens no connection (its key was never filled). */
	if (icmp_error < 0)
		ct_update(&ct, l4.tcp_flags, now);
	return 0;
}

/* Hands the packet straight to a local pod: its eth0 receives it as if from its gateway. The
 * peer's host-side egress hook does not run on this path, so the delivery is counted here.
 * `src_identity`: the sender's identity when the packet vouches for it, else 0 (see enforce).
 * A service reply (`reply` set) is checked as the backend sent it, which is what conntrack
 * remembered, and only then rewritten to the service address the client used. */
static __always_inline int deliver_to_endpoint(struct __sk_buff *skb, struct iphdr *ip,
					       struct endpoint_info *ep, struct lb_tuple *reply,
					       struct lb_nat *original, __u32 src_identity)
{
	__u32 l4_offset = sizeof(struct ethhdr) + (__u32)ip->ihl * 4;
	__u32 len = skb->len;

	/* Checked and reported before the rewrite: storing bytes invalidates header pointers. */
	if (enforce(skb, ip, ep->ifindex, POLICY_INGRESS, OBS_TO_ENDPOINT, src_identity, NULL))
		return TCX_DROP;
	report_flow(skb, ip, ep->ifindex, OBS_TO_ENDPOINT, VERDICT_FORWARDED, DROP_NONE);
	if (reply && lb_translate_reply(skb, l4_offset, reply, original) < 0)
		return TCX_DROP;
	if (bpf_skb_store_bytes(skb, 0, ep->mac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, ep->node_mac, ETH_ALEN, 0) < 0)
		return TCX_DROP;
	count_packet(ep->ifindex, DIRECTION_TO_ENDPOINT, len);
	return bpf_redirect_peer(ep->ifindex, 0);
}

#define VNI_MAX 0xFFFFFF

/* The sender's identity that a packet arriving from the VXLAN device carries in its VNI (set
 * by the sending node's forward_through_tunnel); 0 when it did not come through the tunnel or
 * carries none (the remote node itself sent it). The receiver trusts it over the ipcache,
 * which may not know a new remote pod yet, as Cilium does. */
static __always_inline __u32 tunnel_source_identity(struct __sk_buff *skb, __u32 ifindex,
						    struct node_config *cfg)
{
	struct bpf_tunnel_key key = {};

	if (!cfg || cfg->routing_mode != ROUTING_TUNNEL || ifindex != cfg->tunnel_ifindex)
		return 0;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return 0;
	return key.tunnel_id;
}

/* Sends a packet for a pod on another node into the VXLAN device, addressed to that node. */
static __always_inline int forward_through_tunnel(struct __sk_buff *skb, struct node_config *cfg,
						  struct ipcache_entry *remote, __u32 src_identity)
{
	struct bpf_tunnel_key key = {};

	key.remote_ipv4 = bpf_ntohl(remote->tunnel_endpoint);
	/* The VNI carries 24 bits: an identity that does not fit (clusters 256-511) is not sent
	 * truncated, which would name another cluster's identity; 0 makes the receiver derive it
	 * from the source address instead. */
	key.tunnel_id = src_identity <= VNI_MAX ? src_identity : 0;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0) {
		struct iphdr *ip = ipv4_header(skb);

		if (ip)
			report_flow(skb, ip, skb->ifindex, OBS_TO_OVERLAY, VERDICT_DROPPED,
				    DROP_TUNNEL_KEY_FAILED);
		return TCX_DROP;
	}
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

/* Routes natively with the kernel's FIB and neighbour table, skipping the host stack; when the
 * FIB has no answer the packet goes up the stack and the kernel routes it. */
static __always_inline int forward_natively(struct __sk_buff *skb, struct iphdr *ip)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	/* tot_len 0: GSO packets would fail the MTU check otherwise. */
	fib.tot_len = 0;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TCX_NEXT;
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* Sends a packet whose destination is not on this node: to the node of a remote pod, or out
 * through the node's routes. Used after a service translation, whose rewritten source (a
 * node or service address) the kernel's own forwarding would refuse as martian. */
static __always_inline int forward_off_node(struct __sk_buff *skb, struct iphdr *ip,
					    __u32 src_identity)
{
	struct node_config *cfg = get_node_config();
	struct ipcache_entry *remote = lookup_ipcache(ip->daddr);

	if (cfg && remote && remote->tunnel_endpoint && cfg->routing_mode == ROUTING_TUNNEL)
		return forward_through_tunnel(skb, cfg, remote, src_identity);
	return forward_natively(skb, ip);
}

/* The reply of a service connection this node translated: delivered to a local client, or
 * rewritten and sent on. */
static __always_inline int forward_service_reply(struct __sk_buff *skb, struct iphdr *ip,
						 struct lb_tuple *reply, struct lb_nat *original)
{
	__u32 l4_offset = sizeof(struct ethhdr) + (__u32)ip->ihl * 4;
	struct endpoint_info *client = lookup_endpoint(original->daddr);

	if (client)
		return deliver_to_endpoint(skb, ip, client, reply, original, 0);
	if (lb_translate_reply(skb, l4_offset, reply, original) < 0)
		return TCX_DROP;
	ip = ipv4_header(skb);
	if (!ip)
		return TCX_DROP;
	return forward_off_node(skb, ip, 0);
}

/* An ICMP error lb_translate_icmp_error rewrote: to the local pod or the host it is now
 * addressed to. */
static __always_inline int forward_translated_icmp_error(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_header(skb);
	struct endpoint_info *ep;

	if (!ip)
		return TCX_DROP;
	ep = lookup_endpoint(ip->daddr);
	if (ep)
		return deliver_to_endpoint(skb, ip, ep, NULL, NULL, 0);
	return forward_off_node(skb, ip, 0);
}

#endif
