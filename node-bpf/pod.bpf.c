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
	struct endpoint_info *sender;
	struct peer_lookup destination = {};
	struct lb_nat original = {};
	struct lb_tuple reply = {};
	struct iphdr *ip;
	/* Read once: clang would otherwise pick the ctx offset per branch and load through a
	 * modified ctx pointer, which the verifier refuses. */
	__u32 ifindex = skb->ifindex;
	int lb;

	count_packet(ifindex, DIRECTION_FROM_ENDPOINT, skb->len);

	ip = ipv4_header(skb);
	if (!ip)
		return TCX_NEXT; /* ARP and anything not IPv4: the kernel handles it */
	/* Before anything else reads the source (service translation, policy, the tunnel's
	 * identity): a spoofed packet creates no state anywhere. */
	sender = validated_sender(ifindex, ip);
	if (!sender) {
		report_flow(skb, ip, ifindex, OBS_FROM_ENDPOINT, VERDICT_DROPPED,
			    DROP_SOURCE_SPOOFED);
		return TCX_DROP;
	}
	/* Sockets are balanced at connect() (sock.bpf.c); this catches what they did not, e.g.
	 * pods outside the hooked cgroup. Policy then sees the backend, as it would otherwise. */
	lb = lb_translate_forward(skb, ip, 0);
	if (lb == LB_NOT_A_SERVICE)
		lb_forget_ended_translation(skb, ip);
	if (lb != LB_NOT_A_SERVICE) {
		ip = ipv4_header(skb);
		if (!ip)
			return TCX_DROP;
		if (lb != LB_TRANSLATED) {
			report_flow(skb, ip, ifindex, OBS_FROM_ENDPOINT, VERDICT_DROPPED,
				    lb == LB_NO_BACKEND ? DROP_NO_SERVICE_BACKEND
							: DROP_SERVICE_NAT_FAILED);
			/* Refused at once: the pod's SYN comes back to it as an RST, straight into
			 * its eth0 (not through to_container: no policy stands between a pod and
			 * the refusal of its own connection). */
			if (lb == LB_NO_BACKEND && lb_refuse_syn(skb) == 0)
				return bpf_redirect_peer(ifindex, 0);
			return TCX_DROP;
		}
	}
	if (enforce(skb, ip, ifindex, POLICY_EGRESS, OBS_FROM_ENDPOINT, 0, &destination))
		return TCX_DROP;
	report_flow(skb, ip, ifindex, OBS_FROM_ENDPOINT, VERDICT_FORWARDED, DROP_NONE);

	/* A backend answering a connection translated on this node. */
	if (lb_reverse_lookup(skb, ip, &reply, &original))
		return forward_service_reply(skb, ip, &reply, &original);

	dst_ep = lookup_endpoint(ip->daddr);
	if (dst_ep)
		return deliver_to_endpoint(skb, ip, dst_ep, NULL, NULL, sender->identity);

	cfg = get_node_config();
	/* Policy may have looked the destination up already: once per packet. */
	remote = destination.done ? destination.entry : lookup_ipcache(ip->daddr);
	if (!cfg || !remote || !remote->tunnel_endpoint)
		return TCX_NEXT; /* the node itself, or outside the cluster: the kernel routes it */

	if (cfg->routing_mode == ROUTING_TUNNEL)
		return forward_through_tunnel(skb, cfg, remote, sender->identity);
	return forward_natively(skb, ip);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	struct iphdr *ip;

	ip = ipv4_header(skb);
	if (ip && enforce(skb, ip, skb->ifindex, POLICY_INGRESS, OBS_TO_ENDPOINT, 0, NULL))
		return TCX_DROP;
	/* Counted once policy let it through: what the pod received. */
	count_packet(skb->ifindex, DIRECTION_TO_ENDPOINT, skb->len);
	if (!ip)
		return TCX_NEXT;
	report_flow(skb, ip, skb->ifindex, OBS_TO_ENDPOINT, VERDICT_FORWARDED, DROP_NONE);
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
