/* Programs on the node's network devices (its uplink, and the VXLAN device in tunnel mode),
 * attached with tcx ingress: traffic for a local pod goes straight into the pod. */
#include "lib/common.h"
#include "lib/forward.h"

SEC("classifier")
int from_network(struct __sk_buff *skb)
{
	struct endpoint_info *ep;
	struct node_config *cfg;
	struct lb_nat original = {};
	struct lb_tuple reply = {};
	struct iphdr *ip;
	/* Read once (see from_container). */
	__u32 ifindex = skb->ifindex;
	__u32 src_identity;
	int lb;

	ip = ipv4_header(skb);
	if (!ip)
		return TCX_NEXT;
	/* A backend's reply to a connection this node translated (and SNATed). */
	if (lb_reverse_lookup(skb, ip, &reply, &original))
		return forward_service_reply(skb, ip, &reply, &original);
	/* An ICMP error about such a connection: rewritten for the end that sent what it quotes. */
	lb = lb_translate_icmp_error(skb, ip);
	if (lb != 0)
		return lb < 0 ? TCX_DROP : forward_translated_icmp_error(skb);

	/* NodePort (and service addresses routed here) from outside the node: translated per
	 * packet, with this node as the source when the backend lives elsewhere. */
	cfg = get_node_config();
	src_identity = tunnel_source_identity(skb, ifindex, cfg);
	lb = lb_translate_forward(skb, ip, cfg ? cfg->node_ip : 0);
	if (lb == LB_NOT_A_SERVICE)
		lb_forget_ended_translation(skb, ip);
	if (lb != LB_NOT_A_SERVICE) {
		ip = ipv4_header(skb);
		if (!ip)
			return TCX_DROP;
		/* Nothing to balance to on a node port: the node's own stack refuses at once (TCP
		 * RST, ICMP port unreachable), as no socket listens there. */
		if (lb == LB_NO_BACKEND && cfg && lb_is_node_address(ip->daddr, cfg))
			return TCX_NEXT;
		if (lb != LB_TRANSLATED) {
			report_flow(skb, ip, ifindex, OBS_FROM_NETWORK, VERDICT_DROPPED,
				    lb == LB_NO_BACKEND ? DROP_NO_SERVICE_BACKEND
							: DROP_SERVICE_NAT_FAILED);
			/* Refused at once: the SYN goes back out where it came from as an RST. */
			if (lb == LB_NO_BACKEND && lb_refuse_syn(skb) == 0)
				return bpf_redirect(ifindex, 0);
			return TCX_DROP;
		}
		ep = lookup_endpoint(ip->daddr);
		if (ep)
			return deliver_to_endpoint(skb, ip, ep, NULL, NULL, src_identity);
		return forward_off_node(skb, ip, 0);
	}

	ep = lookup_endpoint(ip->daddr);
	if (!ep)
		return TCX_NEXT;
	return deliver_to_endpoint(skb, ip, ep, NULL, NULL, src_identity);
}

/* Egress of the VXLAN device. Pod traffic arrives here already addressed (from_container set
 * the tunnel key); what the kernel routed here itself — the node talking to a remote pod, or
 * answering one — gets the remote node from the ipcache. */
SEC("classifier")
int to_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct ipcache_entry *remote;
	struct iphdr *ip;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TCX_NEXT;
	ip = ipv4_header(skb);
	if (!ip)
		return TCX_DROP; /* only IPv4 is carried; the drop cannot be reported without it */
	remote = lookup_ipcache(ip->daddr);
	if (!remote || !remote->tunnel_endpoint) {
		report_flow(skb, ip, skb->ifindex, OBS_TO_OVERLAY, VERDICT_DROPPED,
			    DROP_NO_TUNNEL_ENDPOINT);
		return TCX_DROP; /* nowhere to tunnel it to */
	}
	key.remote_ipv4 = bpf_ntohl(remote->tunnel_endpoint);
	key.tunnel_id = 0; /* from the host itself */
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0) {
		report_flow(skb, ip, skb->ifindex, OBS_TO_OVERLAY, VERDICT_DROPPED,
			    DROP_TUNNEL_KEY_FAILED);
		return TCX_DROP;
	}
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
