/* Programs on a pod's host-side veth, attached with tcx: ingress of that device carries what the
 * pod sends, egress what the kernel routes to it. */
#include "lib/common.h"
#include "lib/forward.h"

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct ipcache_entry *remote;
	struct node_config *cfg;
	struct endpoint_info *src_ep;
	struct iphdr *ip;

	count_packet(skb->ifindex, DIRECTION_FROM_ENDPOINT, skb->len);

	ip = ipv4_header(skb);
	if (!ip)
		return TCX_NEXT; /* ARP and anything not IPv4: the kernel handles it */
	if (enforce(skb, ip, skb->ifindex, POLICY_EGRESS, OBS_FROM_ENDPOINT))
		return TCX_DROP;
	report_flow(skb, ip, skb->ifindex, OBS_FROM_ENDPOINT, VERDICT_FORWARDED, DROP_NONE);

	dst_ep = lookup_endpoint(ip->daddr);
	if (dst_ep)
		return deliver_to_endpoint(skb, ip, dst_ep);

	cfg = get_node_config();
	remote = lookup_ipcache(ip->daddr);
	if (!cfg || !remote || !remote->tunnel_endpoint)
		return TCX_NEXT; /* the node itself, or outside the cluster: the kernel routes it */

	if (cfg->routing_mode == ROUTING_TUNNEL) {
		src_ep = lookup_endpoint(ip->saddr);
		return forward_through_tunnel(skb, cfg, remote, src_ep ? src_ep->identity : 0);
	}
	return forward_natively(skb, ip);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	struct iphdr *ip;

	ip = ipv4_header(skb);
	if (ip && enforce(skb, ip, skb->ifindex, POLICY_INGRESS, OBS_TO_ENDPOINT))
		return TCX_DROP;
	/* Counted once policy let it through: what the pod received. */
	count_packet(skb->ifindex, DIRECTION_TO_ENDPOINT, skb->len);
	if (!ip)
		return TCX_NEXT;
	report_flow(skb, ip, skb->ifindex, OBS_TO_ENDPOINT, VERDICT_FORWARDED, DROP_NONE);
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
