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
	return deliver_to_endpoint(skb, ep);
}

char LICENSE[] SEC("license") = "GPL";
