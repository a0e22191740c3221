/* Socket-level load balancing, attached to the node's cgroup (v2): a socket connecting or
 * sending to a service is pointed at a backend before any packet exists, so east-west traffic
 * needs no per-packet NAT, and getpeername()/recvmsg() still show the service's address. */
#include "lib/common.h"
#include "lib/lb.h"

/* Points `ctx` at a backend when it addresses a service. Returns the hook's verdict: 1 lets
 * the call go on, 0 refuses it with ECONNREFUSED (a service with no backend). */
static __always_inline int balance(struct bpf_sock_addr *ctx)
{
	struct lb_service_addr service = {};
	struct lb_frontend *frontend;
	struct lb_backend *backend;
	struct lb_sock_key key = {};
	__u64 netns = bpf_get_netns_cookie(ctx);
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u8 protocol = ctx->protocol;
	struct bpf_sock *sk = ctx->sk;
	__u32 address = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__u32 bound_port = 0;
	__u32 hash;

	if (protocol != LB_PROTO_TCP && protocol != LB_PROTO_UDP)
		return 1;
	frontend = lb_lookup_frontend(address, port, protocol);
	if (!frontend)
		return 1;
	if (frontend->active_backends == 0) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	/* A TCP socket bound to a port before connect() is a flow Maglev keeps on one backend
	 * across every node and restart; other sockets are spread by their cookie, which also
	 * keeps an unconnected UDP socket on one backend after the kernel binds it on first send. */
	if (sk && protocol == LB_PROTO_TCP)
		bound_port = sk->src_port;
	if (bound_port)
		hash = jhash_3words((__u32)netns ^ (__u32)(netns >> 32), bound_port,
				    address ^ port, lb_hash_seed());
	else
		hash = jhash_3words((__u32)cookie, (__u32)(cookie >> 32), address ^ port,
				    lb_hash_seed());
	backend = lb_select(frontend, hash, LB_CLIENT_NETNS, netns);
	if (!backend) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	key.cookie = cookie;
	key.address = backend->address;
	key.port = backend->port;
	service.address = address;
	service.port = port;
	bpf_map_update_elem(&lb_sock_reverse, &key, &service, BPF_ANY);
	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return 1;
}

/* Shows a backend's address as the service the socket addressed. */
static __always_inline void show_service(struct bpf_sock_addr *ctx)
{
	struct lb_service_addr *service;
	struct lb_sock_key key = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	service = bpf_map_lookup_elem(&lb_sock_reverse, &key);
	if (!service)
		return;
	ctx->user_ip4 = service->address;
	ctx->user_port = service->port;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

/* Unconnected UDP: every datagram is balanced (one socket keeps one backend: same cookie). */
SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	show_service(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	show_service(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
