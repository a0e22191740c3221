/* Included first by every program: kernel types from BTF (CO-RE) and libbpf's helpers. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#endif
