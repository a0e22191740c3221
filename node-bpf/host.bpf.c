/* Programs on the node's network devices (its uplink, and the VXLAN device in tunnel mode),
 * attached with tcx ingress: traffic for a local pod goes straight into the pod. */
#include "lib/common.h"
#include "lib/forward.h"

SEC("classifier")
int from_network(struct __sk_buff *skb)
{
	struct endpoint_info *ep;
	struct iphdr *ip;

	ip = ipv4_header(skb);
	if (!ip)
		return TCX_NEXT;
	ep = lookup_endpoint(ip->daddr);
	if (!ep)
		return TCX_NEXT;
	return deliver_to_endpoint(skb, ip, ep);
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
