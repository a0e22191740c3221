/* Stateful connection tracking. One entry per connection, under a key that is the same for
 * both directions (the lower address-and-port end first), so a packet costs one lookup. The
 * entry remembers which end opened the connection: a packet from the other end is a reply and
 * passes without a policy check while the entry is alive; packets from the opener are checked
 * against policy every time, so a connection a new policy denies stops at once.
 *
 * TCP entries follow the connection (SYN sent, established, closing) and each state has its own
 * lifetime; other protocols have one. An entry whose lifetime has passed since its last packet
 * is dead: a late "reply" is then checked as new traffic. The agent sweeps dead entries out
 * (node-agent/src/conntrack.rs); the BPF side never trusts one, swept or not.
 *
 * Userspace mirror: node-bpf/src/maps.rs (CtKey, CtEntry). */
#ifndef WEFT_CONNTRACK_H
#define WEFT_CONNTRACK_H

#include "common.h"

enum ct_state {
	CT_SYN_SENT = 1,    /* TCP: the opener's SYN went out, no answer yet */
	CT_ESTABLISHED = 2, /* TCP: answered; every other protocol from its first packet */
	CT_CLOSING = 3,     /* TCP: FIN or RST seen in either direction */
};

/* Lifetimes in nanoseconds since an entry's last packet. Set by the agent when it loads the
 * programs (--ct-lifetime-*); these are Cilium's defaults. */
volatile const __u64 ct_lifetime_syn_ns = 60ULL * 1000000000ULL;
volatile const __u64 ct_lifetime_established_ns = 21600ULL * 1000000000ULL;
volatile const __u64 ct_lifetime_closing_ns = 10ULL * 1000000000ULL;
volatile const __u64 ct_lifetime_other_ns = 60ULL * 1000000000ULL;

struct ct_key {
	__u32 src_ip; /* network byte order; the lower (address, port) end */
	__u32 dst_ip;
	__u16 src_port; /* host byte order; 0 when not TCP/UDP */
	__u16 dst_port;
	__u8 protocol;
	__u8 pad[3];
};

struct ct_entry {
	__u64 last_seen_ns; /* bpf_ktime_get_ns of the last packet, either direction */
	__u8 state;         /* enum ct_state */
	__u8 opener_is_src; /* 1: the key's src end opened the connection */
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144); /* replaced at load time (--ct-max-entries) */
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

#define CT_TCP_FIN 0x01
#define CT_TCP_SYN 0x02
#define CT_TCP_RST 0x04
#define CT_TCP_ACK 0x10
#define CT_PROTO_TCP 6

/* What connection tracking says about a packet. */
enum ct_verdict {
	CT_NEW = 0,   /* no live entry: policy decides, and an allowed packet opens one */
	CT_OPENER = 1, /* from the end that opened a live connection: policy decides again */
	CT_REPLY = 2, /* from the other end of a live connection: passes */
};

/* The packet's connection, looked up once: `ct_verdict` fills it, `ct_update` writes it. */
struct ct_lookup {
	struct ct_key key;
	struct ct_entry *entry; /* NULL when there is none (or it is dead) */
	__u8 from_src;          /* the packet travels from the key's src end */
};

static __always_inline __u64 ct_lifetime(__u8 protocol, __u8 state)
{
	if (protocol != CT_PROTO_TCP)
		return ct_lifetime_other_ns;
	if (state == CT_SYN_SENT)
		return ct_lifetime_syn_ns;
	if (state == CT_CLOSING)
		return ct_lifetime_closing_ns;
	return ct_lifetime_established_ns;
}

static __always_inline int ct_alive(struct ct_entry *entry, __u8 protocol, __u64 now)
{
	return now - entry->last_seen_ns <= ct_lifetime(protocol, entry->state);
}

static __always_inline int ct_verdict(__u32 src, __u32 dst, __u16 sport, __u16 dport, __u8 proto,
				      __u8 tcp_flags, __u64 now, struct ct_lookup *ct)
{
	int src_first = src < dst || (src == dst && sport <= dport);

	ct->key.src_ip = src_first ? src : dst;
	ct->key.dst_ip = src_first ? dst : src;
	ct->key.src_port = src_first ? sport : dport;
	ct->key.dst_port = src_first ? dport : sport;
	ct->key.protocol = proto;
	ct->from_src = src_first;
	ct->entry = bpf_map_lookup_elem(&conntrack, &ct->key);
	if (ct->entry && !ct_alive(ct->entry, proto, now))
		ct->entry = NULL;
	if (!ct->entry)
		return CT_NEW;
	/* A SYN from the opener on a closing connection starts a new one (port reuse): it is
	 * checked, and not taken as part of the old one. */
	if (proto == CT_PROTO_TCP && ct->entry->state == CT_CLOSING &&
	    (tcp_flags & (CT_TCP_SYN | CT_TCP_ACK)) == CT_TCP_SYN) {
		ct->entry = NULL;
		return CT_NEW;
	}
	return ct->entry->opener_is_src == ct->from_src ? CT_OPENER : CT_REPLY;
}

/* Records a packet that is let through: opens the connection (CT_NEW) or moves it on. */
static __always_inline void ct_update(struct ct_lookup *ct, __u8 tcp_flags, __u64 now)
{
	struct ct_entry *entry = ct->entry;
	__u8 state;

	if (!entry) {
		struct ct_entry fresh = {};

		fresh.last_seen_ns = now;
		fresh.opener_is_src = ct->from_src;
		if (ct->key.protocol != CT_PROTO_TCP)
			fresh.state = CT_ESTABLISHED;
		else if (tcp_flags & (CT_TCP_FIN | CT_TCP_RST))
			fresh.state = CT_CLOSING;
		else if (tcp_flags & CT_TCP_SYN)
			fresh.state = CT_SYN_SENT;
		else
			/* Picked up mid-stream (the agent was replaced, or the entry was evicted):
			 * the policy just allowed it, so it is as good as answered. */
			fresh.state = CT_ESTABLISHED;
		bpf_map_update_elem(&conntrack, &ct->key, &fresh, BPF_ANY);
		return;
	}
	state = entry->state;
	if (ct->key.protocol == CT_PROTO_TCP) {
		if (tcp_flags & (CT_TCP_FIN | CT_TCP_RST))
			state = CT_CLOSING;
		else if (state == CT_SYN_SENT && entry->opener_is_src != ct->from_src)
			state = CT_ESTABLISHED; /* the answer to the SYN */
	}
	entry->state = state;
	entry->last_seen_ns = now;
}

#endif
