// LD_PRELOAD shim: makes every CPUID instruction the process executes once it is loaded (and those
// of the programs it starts with the same LD_PRELOAD) report an AVX2-only CPU: no AVX-512, AVX-VNNI,
// AMX or AVX10. It uses Linux's CPUID faulting (ARCH_SET_CPUID; the CPU must list `cpuid_fault` in
// /proc/cpuinfo; inherited by threads and forks, reset by execve, hence the preload). A benchmarking
// aid: ONNX Runtime, tract, the gemm crate and tabconv then all dispatch to their AVX2 kernels on an
// AVX-512 machine. glibc's loader reads CPUID before this runs: docs/bench.sh also sets
// GLIBC_TUNABLES so that glibc's string functions leave AVX-512 too.
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#include <cpuid.h>

static int set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void on_segv(int sig, siginfo_t *info, void *ctx) {
  ucontext_t *uc = ctx;
  greg_t *g = uc->uc_mcontext.gregs;
  const uint8_t *ip = (const uint8_t *)g[REG_RIP];
  // a faulted CPUID arrives as SI_KERNEL at a readable instruction; anything else is a real fault
  if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
    signal(SIGSEGV, SIG_DFL);
    return;  // re-executes and dies with the default action
  }
  uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], a, b, c, d;
  set_cpuid(1);
  __cpuid_count(leaf, sub, a, b, c, d);
  set_cpuid(0);
  if (leaf == 7 && sub == 0) {
    // EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL
    b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
           (1u << 30) | (1u << 31));
    // ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
    c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
    // EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8
    d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
  } else if (leaf == 7 && sub == 1) {
    a &= ~((1u << 4) | (1u << 5));  // AVX-VNNI, AVX512_BF16
    d &= ~(1u << 19);               // AVX10
  } else if (leaf == 0xd && sub == 0) {
    // XCR0 components of AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM) and AMX (XTILECFG, XTILEDATA)
    a &= ~(0xe0u | (3u << 17));
  }
  g[REG_RAX] = a; g[REG_RBX] = b; g[REG_RCX] = c; g[REG_RDX] = d;
  g[REG_RIP] += 2;
}

__attribute__((constructor)) static void init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
  if (set_cpuid(0) != 0) {
    perror("cpuid_avx2: ARCH_SET_CPUID (needs cpuid_fault)");
    exit(2);
  }
}
