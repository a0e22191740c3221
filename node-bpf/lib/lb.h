/* Service load balancing (kube-proxy replacement). The agent compiles Services and their
 * EndpointSlices (weft-core service) into frontends, backends and one Maglev table per distinct
 * set of active backends. Two paths read them:
 *  - sock.bpf.c rewrites a local socket's destination at connect()/sendmsg() time, so pod and
 *    host traffic to a service carries the backend's address from its first packet;
 *  - lb_translate_forward()/lb_reverse_lookup() translate packets that no local socket sent
 *    (NodePort from outside or from other nodes) at tc, with SNAT when the backend is on
 *    another node so the reply comes back through the node that translated it.
 * Userspace mirror: node-bpf/src/maps.rs (LbFrontendKey, LbFrontend, LbBackend, ...). */
#ifndef WEFT_LB_H
#define WEFT_LB_H

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "endpoints.h"
#include "jhash.h"

#define ECONNREFUSED 111
#define BPF_F_INNER_MAP (1U << 12)
#define LB_PROTO_TCP 6
#define LB_PROTO_UDP 17

enum lb_frontend_kind {
	LB_KIND_CLUSTER_IP = 0,
	LB_KIND_NODE_PORT = 1,
	LB_KIND_EXTERNAL_IP = 2,
	LB_KIND_LOAD_BALANCER = 3,
	LB_KIND_HOST_PORT = 4, /* a pod's hostPort: its node's addresses, that pod only */
};

/* NodePort frontends have address 0: they answer on every address of the node. */
struct lb_frontend_key {
	__u32 address; /* network byte order */
	__u16 port;    /* network byte order */
	__u8 protocol;
	__u8 pad;
};

struct lb_frontend {
	__u32 service_id;         /* names the service in affinity entries */
	__u32 table_id;           /* the Maglev table of the active backends */
	__u32 affinity_timeout_s; /* sessionAffinity ClientIP; 0: none */
	__u16 active_backends;    /* 0: the service refuses new connections at once */
	__u8 kind;                /* enum lb_frontend_kind */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_frontend_key);
	__type(value, struct lb_frontend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_frontends SEC(".maps");

#define LB_BACKEND_TERMINATING 1

struct lb_backend {
	__u32 address; /* network byte order */
	__u16 port;    /* network byte order */
	__u16 cluster_id;
	__u8 flags; /* LB_BACKEND_* */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* backend id */
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

/* Table id -> slot -> backend id. Inner tables are created by the agent with the configured
 * (prime) size; BPF_F_INNER_MAP lets their size differ from this template's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_ARRAY);
		__uint(max_entries, 16381);
		__uint(map_flags, BPF_F_INNER_MAP);
		__type(key, __u32);
		__type(value, __u32);
	});
} lb_maglev SEC(".maps");

enum lb_client_kind {
	LB_CLIENT_IP = 0,    /* per-packet path: the client's address */
	LB_CLIENT_NETNS = 1, /* socket path: the client's network namespace, i.e. its pod */
};

struct lb_affinity_key {
	__u64 client;
	__u32 service_id;
	__u32 client_kind; /* enum lb_client_kind */
};

struct lb_affinity {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

/* What a socket asked for, so getpeername() and UDP recvmsg() show the service, not the
 * backend the socket was sent to. */
struct lb_sock_key {
	__u64 cookie;  /* bpf_get_socket_cookie */
	__u32 address; /* the backend, network byte order */
	__u16 port;
	__u16 pad;
};

struct lb_service_addr {
	__u32 address;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_sock_key);
	__type(value, struct lb_service_addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_reverse SEC(".maps");

/* A packet's addresses and ports, all in network byte order. */
struct lb_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

/* What to rewrite a packet's addresses and ports to. */
struct lb_nat {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* How far a translated connection has got, recorded in both of its entries. */
#define LB_NAT_REPLIED 0x01     /* the backend answered */
#define LB_NAT_FIN_CLIENT 0x02  /* the client sent a FIN */
#define LB_NAT_FIN_BACKEND 0x04 /* the backend sent a FIN */
#define LB_NAT_RST 0x08         /* either end reset it */
#define LB_NAT_FIN_BOTH (LB_NAT_FIN_CLIENT | LB_NAT_FIN_BACKEND)

/* One direction of a translated connection. Entries live as long as their connection would in
 * conntrack (the same lifetimes) and are removed by the agent's collector once both directions
 * are dead (node-agent/src/nat.rs), never by LRU eviction: an SNAT port belongs to its
 * connection until that connection ends. */
struct lb_nat_entry {
	struct lb_nat to;
	__u8 progress; /* LB_NAT_* */
	__u8 pad[3];
	__u64 last_seen_ns; /* the last packet in this entry's direction */
};

/* Translated connections by their original forward tuple: later packets keep their backend
 * even when the Maglev table changes (a backend added, or one draining). Sized by the agent
 * (--nat-max-entries); when full, new translations fail and are reported. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_tuple);
	__type(value, struct lb_nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_flows SEC(".maps");

/* Replies of translated connections, by their tuple as they arrive from the backend. With SNAT,
 * an entry here is what holds the SNAT port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_tuple);
	__type(value, struct lb_nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_reverse SEC(".maps");

/* Source ports for SNAT, set by the agent when it loads the programs (--snat-port-range; by
 * default the ports above the node's ip_local_port_range, so they never collide with the node's
 * own connections). */
volatile const __u32 lb_snat_port_min = 61000;
volatile const __u32 lb_snat_port_count = 4536;
#define LB_SNAT_TRIES 16

static __always_inline __u64 lb_nat_lifetime(__u8 protocol, __u8 progress)
{
	if (protocol != LB_PROTO_TCP)
		return ct_lifetime_other_ns;
	if (progress & (LB_NAT_RST | LB_NAT_FIN_BOTH))
		return ct_lifetime_closing_ns;
	if (!(progress & LB_NAT_REPLIED))
		return ct_lifetime_syn_ns;
	return ct_lifetime_established_ns;
}

/* Whether the connection holding an SNAT port has ended, so a new one may take the port: reset,
 * closed from both ends, or silent for longer than its lifetime. */
static __always_inline int lb_nat_ended(struct lb_nat_entry *entry, __u8 protocol, __u64 now)
{
	if (protocol == LB_PROTO_TCP &&
	    ((entry->progress & LB_NAT_RST) ||
	     (entry->progress & LB_NAT_FIN_BOTH) == LB_NAT_FIN_BOTH))
		return 1;
	return now - entry->last_seen_ns > lb_nat_lifetime(protocol, entry->progress);
}

/* The key of the other direction of the connection whose entry translates to `to`. */
static __always_inline void lb_tuple_answering(struct lb_tuple *out, const struct lb_nat *to,
					       __u8 protocol)
{
	out->saddr = to->daddr;
	out->daddr = to->saddr;
	out->sport = to->dport;
	out->dport = to->sport;
	out->protocol = protocol;
	out->pad[0] = out->pad[1] = out->pad[2] = 0;
}

/* Records a packet in its entry. What ends a connection (FIN, RST) and the backend's first
 * answer are also written into the other direction's entry: rare packets, so the common one
 * costs no second lookup. */
static __always_inline void lb_nat_seen(struct lb_nat_entry *entry, void *other_direction,
					__u8 protocol, __u8 progress, __u64 now)
{
	struct lb_nat_entry *other;
	struct lb_tuple key;

	entry->last_seen_ns = now;
	if ((entry->progress & progress) == progress)
		return;
	entry->progress |= progress;
	lb_tuple_answering(&key, &entry->to, protocol);
	other = bpf_map_lookup_elem(other_direction, &key);
	if (other)
		other->progress |= progress;
}

static __always_inline int lb_is_node_address(__u32 address, struct node_config *cfg)
{
	return address == cfg->node_ip || (bpf_ntohl(address) >> 24) == 127 ||
	       bpf_map_lookup_elem(&node_addresses, &address) != NULL;
}

/* The frontend a destination belongs to: an exact address, else a NodePort on a node address.
 * The node-address check comes last: only packets to a node port's number pay for it. */
static __always_inline struct lb_frontend *lb_lookup_frontend(__u32 daddr, __u16 dport,
							      __u8 protocol)
{
	struct lb_frontend_key key = { .address = daddr, .port = dport, .protocol = protocol };
	struct lb_frontend *frontend;
	struct node_config *cfg;

	frontend = bpf_map_lookup_elem(&lb_frontends, &key);
	if (frontend)
		return frontend;
	key.address = 0;
	frontend = bpf_map_lookup_elem(&lb_frontends, &key);
	if (!frontend)
		return NULL;
	cfg = get_node_config();
	if (!cfg || !lb_is_node_address(daddr, cfg))
		return NULL;
	return frontend;
}

static __always_inline struct lb_backend *lb_maglev_pick(struct lb_frontend *frontend, __u32 hash,
							 __u32 *backend_id)
{
	struct node_config *cfg = get_node_config();
	__u32 table_id = frontend->table_id;
	__u32 slot;
	__u32 *id;
	void *table;

	if (!cfg || cfg->maglev_table_size == 0)
		return NULL;
	table = bpf_map_lookup_elem(&lb_maglev, &table_id);
	if (!table)
		return NULL;
	slot = hash % cfg->maglev_table_size;
	id = bpf_map_lookup_elem(table, &slot);
	if (!id)
		return NULL;
	*backend_id = *id;
	return bpf_map_lookup_elem(&lb_backends, id);
}

/* The backend for a new connection: the client's affine backend while it is fresh and not
 * draining, else Maglev's choice for `hash` (remembered when the service has affinity). */
static __always_inline struct lb_backend *lb_select(struct lb_frontend *frontend, __u32 hash,
						    __u32 client_kind, __u64 client)
{
	struct lb_affinity_key key = {
		.client = client, .service_id = frontend->service_id, .client_kind = client_kind,
	};
	struct lb_affinity fresh = {};
	struct lb_affinity *affine;
	struct lb_backend *backend;
	__u64 now = bpf_ktime_get_ns();
	__u32 backend_id = 0;

	if (frontend->affinity_timeout_s) {
		affine = bpf_map_lookup_elem(&lb_affinity, &key);
		if (affine && now - affine->last_used_ns <
				      (__u64)frontend->affinity_timeout_s * 1000000000ULL) {
			backend_id = affine->backend_id;
			backend = bpf_map_lookup_elem(&lb_backends, &backend_id);
			if (backend && !(backend->flags & LB_BACKEND_TERMINATING)) {
				affine->last_used_ns = now;
				return backend;
			}
		}
	}
	backend = lb_maglev_pick(frontend, hash, &backend_id);
	if (backend && frontend->affinity_timeout_s) {
		fresh.last_used_ns = now;
		fresh.backend_id = backend_id;
		bpf_map_update_elem(&lb_affinity, &key, &fresh, BPF_ANY);
	}
	return backend;
}

static __always_inline __u32 lb_hash_seed(void)
{
	struct node_config *cfg = get_node_config();

	return cfg ? cfg->lb_hash_seed : 0;
}

/* Reads the tuple of an IPv4 packet; 0 when it is not TCP or UDP (or is truncated). */
static __always_inline int lb_read_tuple(struct __sk_buff *skb, struct iphdr *ip,
					 struct lb_tuple *tuple)
{
	void *data_end = ctx_data_end(skb);
	__u16 *ports = (void *)ip + ((__u32)ip->ihl * 4);

	if (ip->protocol != LB_PROTO_TCP && ip->protocol != LB_PROTO_UDP)
		return 0;
	if ((void *)(ports + 2) > data_end)
		return 0;
	tuple->saddr = ip->saddr;
	tuple->daddr = ip->daddr;
	tuple->sport = ports[0];
	tuple->dport = ports[1];
	tuple->protocol = ip->protocol;
	/* Keys are hashed whole: the padding must be zero too. */
	tuple->pad[0] = tuple->pad[1] = tuple->pad[2] = 0;
	return 1;
}

/* A TCP packet's flags (byte 13 of its header); 0 for other protocols. */
static __always_inline __u8 lb_tcp_flags(struct __sk_buff *skb, struct iphdr *ip)
{
	void *data_end = ctx_data_end(skb);
	__u8 *tcp = (void *)ip + ((__u32)ip->ihl * 4);

	if (ip->protocol != LB_PROTO_TCP || (void *)(tcp + 14) > data_end)
		return 0;
	return tcp[13];
}

/* SYN without ACK: the packet that opens a connection. */
static __always_inline int lb_is_syn(__u8 tcp_flags)
{
	return (tcp_flags & (CT_TCP_SYN | CT_TCP_ACK)) == CT_TCP_SYN;
}

/* What a packet tells about its connection's progress, seen from the client (`from_client`)
 * or from the backend. */
static __always_inline __u8 lb_progress_of(__u8 tcp_flags, int from_client)
{
	__u8 progress = from_client ? 0 : LB_NAT_REPLIED;

	if (tcp_flags & CT_TCP_RST)
		progress |= LB_NAT_RST;
	if (tcp_flags & CT_TCP_FIN)
		progress |= from_client ? LB_NAT_FIN_CLIENT : LB_NAT_FIN_BACKEND;
	return progress;
}

/* Rewrites addresses and ports from `from` to `to`, fixing the IPv4 and TCP/UDP checksums
 * incrementally. Header pointers are invalid afterwards. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, __u32 l4_offset,
				      const struct lb_tuple *from, const struct lb_nat *to)
{
	__u32 l3_offset = sizeof(struct ethhdr);
	__u32 csum_offset = l4_offset + (from->protocol == LB_PROTO_TCP ? 16 : 6);
	__u64 mangled = from->protocol == LB_PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from->saddr != to->saddr) {
		if (bpf_l4_csum_replace(skb, csum_offset, from->saddr, to->saddr,
					BPF_F_PSEUDO_HDR | mangled | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3_offset + 10, from->saddr, to->saddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3_offset + 12, &to->saddr, 4, 0) < 0)
			return -1;
	}
	if (from->daddr != to->daddr) {
		if (bpf_l4_csum_replace(skb, csum_offset, from->daddr, to->daddr,
					BPF_F_PSEUDO_HDR | mangled | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3_offset + 10, from->daddr, to->daddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3_offset + 16, &to->daddr, 4, 0) < 0)
			return -1;
	}
	if (from->sport != to->sport) {
		if (bpf_l4_csum_replace(skb, csum_offset, from->sport, to->sport, mangled | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4_offset, &to->sport, 2, 0) < 0)
			return -1;
	}
	if (from->dport != to->dport) {
		if (bpf_l4_csum_replace(skb, csum_offset, from->dport, to->dport, mangled | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4_offset + 2, &to->dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* Takes a source port on `snat_ip` for a new connection to `forward`'s backend: a free one, or
 * one whose connection has ended (its forward entry goes with it). Inserts the reply entry
 * `reply_to` under it. 0 when the tries run out or the table is full (the packet is then
 * dropped and reported). */
static __always_inline __u16 lb_snat_port(struct lb_nat *forward, __u8 protocol, __u32 hash,
					  struct lb_nat_entry *reply_to, __u64 now)
{
	struct lb_tuple reply = {
		.saddr = forward->daddr, .daddr = forward->saddr, .sport = forward->dport,
		.protocol = protocol,
	};
	struct lb_nat_entry *taken;
	struct lb_nat_entry *ended;
	struct lb_tuple ended_key;
	__u32 count = lb_snat_port_count ? lb_snat_port_count : 1;
	__u16 port;
	int i;

	for (i = 0; i < LB_SNAT_TRIES; i++) {
		port = bpf_htons(lb_snat_port_min + (hash + i * 7919) % count);
		reply.dport = port;
		if (bpf_map_update_elem(&lb_reverse, &reply, reply_to, BPF_NOEXIST) == 0)
			return port;
		taken = bpf_map_lookup_elem(&lb_reverse, &reply);
		if (!taken)
			continue;
		/* A retransmitted SYN (or the client reusing its port) finds its own first try: the
		 * same port, or the backend would see two connections. The entry starts afresh. */
		if (taken->to.saddr == reply_to->to.saddr && taken->to.daddr == reply_to->to.daddr &&
		    taken->to.sport == reply_to->to.sport && taken->to.dport == reply_to->to.dport) {
			if (bpf_map_update_elem(&lb_reverse, &reply, reply_to, BPF_EXIST) == 0)
				return port;
			continue;
		}
		if (!lb_nat_ended(taken, protocol, now))
			continue;
		/* The ended connection's late packets must not be translated into the new one. */
		lb_tuple_answering(&ended_key, &taken->to, protocol);
		ended = bpf_map_lookup_elem(&lb_flows, &ended_key);
		if (ended && ended->to.saddr == forward->saddr && ended->to.sport == port &&
		    ended->to.daddr == forward->daddr && ended->to.dport == forward->dport)
			bpf_map_delete_elem(&lb_flows, &ended_key);
		if (bpf_map_update_elem(&lb_reverse, &reply, reply_to, BPF_EXIST) == 0)
			return port;
	}
	return 0;
}

static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

struct tcp_pseudo_header {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 protocol;
	__u16 length;
};

/* Turns a TCP SYN for a service with no backend into the RST that refuses it, addressed back to
 * its sender, so the client fails at once instead of retrying SYNs into nothing. Returns 0 when
 * the packet is now that RST (the caller sends it back out where it came from). */
static __always_inline int lb_refuse_syn(struct __sk_buff *skb)
{
	const __u32 headers = sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct tcphdr);
	struct tcp_pseudo_header pseudo = {};
	__u8 mac[ETH_ALEN];
	struct ethhdr *eth;
	struct tcphdr *tcp;
	struct iphdr *ip;
	__u32 address;
	__u16 port;
	__u32 seq;
	__u32 sum;
	void *data_end;

	eth = ctx_data(skb);
	data_end = ctx_data_end(skb);
	ip = (void *)(eth + 1);
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end || ip->protocol != LB_PROTO_TCP || ip->ihl != 5)
		return -1;
	if ((((__u8 *)tcp)[13] & 0x12) != 0x02)
		return -1; /* only a SYN opens a connection to refuse */
	seq = tcp->seq;
	if (bpf_skb_change_tail(skb, headers, 0) < 0)
		return -1;
	eth = ctx_data(skb);
	data_end = ctx_data_end(skb);
	ip = (void *)(eth + 1);
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return -1;

	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	address = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = address;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	ip->ttl = 64;
	ip->frag_off = 0;
	ip->check = 0;
	ip->check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));

	port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	tcp->ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
	tcp->seq = 0;
	((__u8 *)tcp)[12] = (sizeof(struct tcphdr) / 4) << 4; /* data offset, no options */
	((__u8 *)tcp)[13] = 0x14;                               /* RST, ACK */
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;
	pseudo.saddr = ip->saddr;
	pseudo.daddr = ip->daddr;
	pseudo.protocol = LB_PROTO_TCP;
	pseudo.length = bpf_htons(sizeof(struct tcphdr));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)tcp, sizeof(*tcp), sum);
	tcp->check = csum_fold(sum);
	return 0;
}

enum lb_result {
	LB_NOT_A_SERVICE = 0,
	LB_TRANSLATED = 1,
	LB_NO_BACKEND = 2, /* a service with no backend for new connections: refuse */
	LB_FAILED = 3,     /* a rewrite or SNAT port allocation failed */
};

/* Translates a packet sent to a service frontend to its backend. With `snat_ip` set, a packet
 * for a backend on another node also gets `snat_ip` as its source, so the reply returns here. */
static __always_inline int lb_translate_forward(struct __sk_buff *skb, struct iphdr *ip,
						__u32 snat_ip)
{
	struct lb_frontend *frontend;
	struct lb_backend *backend;
	struct lb_tuple tuple = {};
	struct lb_nat_entry forward = {};
	struct lb_nat_entry reply_to = {};
	struct lb_nat translated;
	struct lb_tuple reply = {};
	struct lb_nat_entry *known;
	__u64 now = bpf_ktime_get_ns();
	__u32 l4_offset;
	__u32 hash;
	__u8 tcp_flags;

	if (!lb_read_tuple(skb, ip, &tuple))
		return LB_NOT_A_SERVICE;
	l4_offset = sizeof(struct ethhdr) + (__u32)ip->ihl * 4;
	/* Only traffic to a frontend pays for the connection lookup; a service that is gone takes
	 * its connections' translations with it, as kube-proxy flushes their conntrack entries. */
	frontend = lb_lookup_frontend(tuple.daddr, tuple.dport, tuple.protocol);
	if (!frontend)
		return LB_NOT_A_SERVICE;
	tcp_flags = lb_tcp_flags(skb, ip);
	/* A SYN starts a new connection even when a closed one left its translation behind under
	 * the same tuple (a reused source port): the backend is chosen again. */
	known = lb_is_syn(tcp_flags) ? NULL : bpf_map_lookup_elem(&lb_flows, &tuple);
	if (known) {
		translated = known->to;
		lb_nat_seen(known, &lb_reverse, tuple.protocol, lb_progress_of(tcp_flags, 1), now);
		return lb_rewrite(skb, l4_offset, &tuple, &translated) ? LB_FAILED : LB_TRANSLATED;
	}
	if (frontend->active_backends == 0)
		return LB_NO_BACKEND;
	hash = jhash_3words(tuple.saddr, tuple.daddr,
			    ((__u32)tuple.sport << 16 | tuple.dport) ^ tuple.protocol, lb_hash_seed());
	backend = lb_select(frontend, hash, LB_CLIENT_IP, tuple.saddr);
	if (!backend)
		return LB_NO_BACKEND;

	translated.saddr = tuple.saddr;
	translated.sport = tuple.sport;
	translated.daddr = backend->address;
	translated.dport = backend->port;
	reply_to.to.saddr = tuple.daddr;
	reply_to.to.sport = tuple.dport;
	reply_to.to.daddr = tuple.saddr;
	reply_to.to.dport = tuple.sport;
	reply_to.last_seen_ns = now;
	if (snat_ip && !lookup_endpoint(backend->address)) {
		translated.saddr = snat_ip;
		translated.sport = lb_snat_port(&translated, tuple.protocol, hash, &reply_to, now);
		if (!translated.sport)
			return LB_FAILED;
	} else {
		lb_tuple_answering(&reply, &translated, tuple.protocol);
		if (bpf_map_update_elem(&lb_reverse, &reply, &reply_to, BPF_ANY) < 0)
			return LB_FAILED;
	}
	forward.to = translated;
	forward.progress = lb_progress_of(tcp_flags, 1);
	forward.last_seen_ns = now;
	if (bpf_map_update_elem(&lb_flows, &tuple, &forward, BPF_ANY) < 0) {
		/* Full: no translation without its forward entry, and no port held for it. */
		lb_tuple_answering(&reply, &translated, tuple.protocol);
		bpf_map_delete_elem(&lb_reverse, &reply);
		return LB_FAILED;
	}
	return lb_rewrite(skb, l4_offset, &tuple, &translated) ? LB_FAILED : LB_TRANSLATED;
}

/* A TCP connection that opens without translation owns its tuple from then on: a translated
 * connection that used the same tuple earlier (a client outside the hooked cgroup that went
 * through the service before, then to the backend directly from the same port) has ended, and
 * its reply translation must not rewrite the new connection's replies. */
static __always_inline void lb_forget_ended_translation(struct __sk_buff *skb, struct iphdr *ip)
{
	struct lb_tuple tuple = {};
	struct lb_tuple reply = {};

	if (!lb_is_syn(lb_tcp_flags(skb, ip)) || !lb_read_tuple(skb, ip, &tuple))
		return;
	reply.saddr = tuple.daddr;
	reply.daddr = tuple.saddr;
	reply.sport = tuple.dport;
	reply.dport = tuple.sport;
	reply.protocol = tuple.protocol;
	bpf_map_delete_elem(&lb_reverse, &reply);
}

/* Whether a packet is the reply of a translated connection; fills what to rewrite it to and
 * records the reply in the connection's entries. */
static __always_inline int lb_reverse_lookup(struct __sk_buff *skb, struct iphdr *ip,
					     struct lb_tuple *tuple, struct lb_nat *original)
{
	struct lb_nat_entry *found;

	if (!lb_read_tuple(skb, ip, tuple))
		return 0;
	found = bpf_map_lookup_elem(&lb_reverse, tuple);
	if (!found)
		return 0;
	*original = found->to;
	lb_nat_seen(found, &lb_flows, tuple->protocol, lb_progress_of(lb_tcp_flags(skb, ip), 0),
		    bpf_ktime_get_ns());
	return 1;
}

#define LB_PROTO_ICMP 1
#define LB_ICMP_DEST_UNREACH 3
#define LB_ICMP_TIME_EXCEEDED 11
/* Offsets in an Ethernet frame carrying an ICMP error with option-less IPv4 headers. */
#define LB_ICMP_OFFSET (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define LB_ICMP_CSUM_OFFSET (LB_ICMP_OFFSET + 2)
#define LB_ICMP_INNER_IP_OFFSET (LB_ICMP_OFFSET + 8)
#define LB_ICMP_INNER_L4_OFFSET (LB_ICMP_INNER_IP_OFFSET + sizeof(struct iphdr))

/* An ICMP error (fragmentation needed, unreachable, time exceeded) about a packet this node
 * translated quotes the translated packet, which the end that sent it never saw: without this,
 * Path MTU discovery fails through NodePorts and the connection stalls in a black hole. The
 * quoted packet is rewritten to what its sender sent and the error is addressed to that sender,
 * found in the translation of the quoted packet's answering direction (`lb_flows` when the
 * quoted packet was a reply this node rewrote for its client, `lb_reverse` when it was a packet
 * this node translated for the backend). Returns 1 when the error was rewritten, 0 when it is
 * not about a translated connection, -1 when the rewrite failed. Only the ICMP
 * checksum and the quoted IPv4 header's are kept right: nobody checks the quoted TCP or UDP
 * checksum of an error, and the quoted header is only part of the packet anyway. */
static __always_inline int lb_translate_icmp_error(struct __sk_buff *skb, struct iphdr *ip)
{
	void *data_end = ctx_data_end(skb);
	__u8 *icmp = (void *)(ip + 1);
	struct iphdr inner;
	struct lb_tuple answering = {};
	struct lb_nat_entry *found;
	struct lb_nat was;
	__u16 ports[2];
	__u32 outer_daddr = ip->daddr;

	if (ip->protocol != LB_PROTO_ICMP || ip->ihl != 5 || (void *)(icmp + 1) > data_end)
		return 0;
	if (icmp[0] != LB_ICMP_DEST_UNREACH && icmp[0] != LB_ICMP_TIME_EXCEEDED)
		return 0;
	if (bpf_skb_load_bytes(skb, LB_ICMP_INNER_IP_OFFSET, &inner, sizeof(inner)) < 0 ||
	    inner.ihl != 5 ||
	    (inner.protocol != LB_PROTO_TCP && inner.protocol != LB_PROTO_UDP) ||
	    bpf_skb_load_bytes(skb, LB_ICMP_INNER_L4_OFFSET, ports, sizeof(ports)) < 0)
		return 0;
	/* The quoted packet went from inner.saddr to inner.daddr; its connection's other direction
	 * is keyed by the reverse. */
	answering.saddr = inner.daddr;
	answering.daddr = inner.saddr;
	answering.sport = ports[1];
	answering.dport = ports[0];
	answering.protocol = inner.protocol;
	found = bpf_map_lookup_elem(&lb_flows, &answering);
	if (!found)
		found = bpf_map_lookup_elem(&lb_reverse, &answering);
	if (!found)
		return 0;
	/* The answering direction is translated to `to`; the quoted packet, before this node
	 * translated it, went the opposite way. */
	was.saddr = found->to.daddr;
	was.daddr = found->to.saddr;
	was.sport = found->to.dport;
	was.dport = found->to.sport;

	if (bpf_l3_csum_replace(skb, LB_ICMP_INNER_IP_OFFSET + 10, inner.saddr, was.saddr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, LB_ICMP_INNER_IP_OFFSET + 12, &was.saddr, 4, 0) < 0 ||
	    bpf_l3_csum_replace(skb, LB_ICMP_INNER_IP_OFFSET + 10, inner.daddr, was.daddr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, LB_ICMP_INNER_IP_OFFSET + 16, &was.daddr, 4, 0) < 0)
		return -1;
	/* The quoted IPv4 header sums to the same with its checksum: only the ports move the
	 * ICMP checksum. */
	if (bpf_l4_csum_replace(skb, LB_ICMP_CSUM_OFFSET, ports[0], was.sport, 2) < 0 ||
	    bpf_skb_store_bytes(skb, LB_ICMP_INNER_L4_OFFSET, &was.sport, 2, 0) < 0 ||
	    bpf_l4_csum_replace(skb, LB_ICMP_CSUM_OFFSET, ports[1], was.dport, 2) < 0 ||
	    bpf_skb_store_bytes(skb, LB_ICMP_INNER_L4_OFFSET + 2, &was.dport, 2, 0) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + 10, outer_daddr, was.saddr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + 16, &was.saddr, 4, 0) < 0)
		return -1;
	return 1;
}

/* Rewrites a reply found by lb_reverse_lookup back to the addresses its client used. */
static __always_inline int lb_translate_reply(struct __sk_buff *skb, __u32 l4_offset,
					      struct lb_tuple *tuple, struct lb_nat *original)
{
	return lb_rewrite(skb, l4_offset, tuple, original);
}

#endif
