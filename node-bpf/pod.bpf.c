/* Programs on a pod's host-side veth, attached with tcx: ingress of that device carries what the
 * pod sends, egress what it receives. */
#include "lib/common.h"
#include "lib/counters.h"

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	count_packet(skb->ifindex, DIRECTION_FROM_ENDPOINT, skb->len);
	return TCX_NEXT;
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	count_packet(skb->ifindex, DIRECTION_TO_ENDPOINT, skb->len);
	return TCX_NEXT;
}

char LICENSE[] SEC("license") = "GPL";
