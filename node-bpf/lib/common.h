/* Included first by every program: kernel types from BTF (CO-RE) and libbpf's helpers. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* UAPI macros that vmlinux.h (types only) does not carry. */
#define ETH_P_IP 0x0800
#define ETH_ALEN 6
#define AF_INET 2
#define BPF_F_ZERO_CSUM_TX (1ULL << 1)

#endif
