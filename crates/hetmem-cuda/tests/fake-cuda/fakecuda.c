// A fake libcuda.so for running tests/gpu.rs, tests/backend.rs and the probe on a machine without
// a GPU: scripts/fake-cuda-check.sh builds it and runs them against it. It checks the Rust side's
// logic (arguments, lengths, offsets, lifetimes, error paths), not CUDA's behaviour: "device
// memory" is host memory behind a translation table, copies and fills are synchronous (so a
// missing fence or a wrong stream order goes unnoticed here), kernels are C versions of the
// shipped ones, and driver answers are guesses where the real driver was not probed.
//
// What it does check: copies and fills reach only mapped device ranges (else INVALID_VALUE);
// chunks are unmapped before they are released and reservations emptied before they are freed
// (else it aborts); fresh chunks read 0x5a, so a zero fill that was skipped shows. Events answer
// "not ready" now and then, so pollers must poll. One test hook, fakecuda_fail_next_event(),
// makes the next event recorded report CUDA_ERROR_ILLEGAL_ADDRESS (as a faulting copy would);
// unlike a real driver, the context stays usable afterwards.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/mman.h>

typedef int CUresult;
typedef unsigned long long u64;
enum { OK = 0, INVALID_VALUE = 1, OOM = 2, INVALID_IMAGE = 200, INVALID_PTX = 218, UNSUPPORTED_PTX = 222,
       NOT_FOUND = 500, NOT_READY = 600, ILLEGAL_ADDRESS = 700, ALREADY_REGISTERED = 712, NOT_REGISTERED = 713, INVALID_HANDLE = 400 };
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
#define MB2 (2ull << 20)

struct ent { u64 dev; size_t len; char* host; int kind; };  // kind 1 vmm, 2 registered, 3 pinned, 4 managed
static struct ent ents[8192]; static int nents;
struct res { u64 ptr; size_t size; }; static struct res resv[4096]; static int nres;

static char* tr(u64 d, size_t n) {  // translate a device range; NULL if not inside one entry
  pthread_mutex_lock(&mu);
  char* r = NULL;
  for (int i = 0; i < nents; i++)
    if (d >= ents[i].dev && d + n <= ents[i].dev + ents[i].len) { r = ents[i].host + (d - ents[i].dev); break; }
  pthread_mutex_unlock(&mu);
  return r;
}
// Host pointer for device address d and how many bytes (up to n) follow it in the same entry.
static char* piece(u64 d, size_t n, size_t* got) {
  pthread_mutex_lock(&mu);
  char* r = NULL;
  for (int i = 0; i < nents; i++)
    if (d >= ents[i].dev && d < ents[i].dev + ents[i].len) {
      r = ents[i].host + (d - ents[i].dev);
      size_t avail = ents[i].dev + ents[i].len - d;
      *got = avail < n ? avail : n;
      break;
    }
  pthread_mutex_unlock(&mu);
  return r;
}
static int covered(u64 d, size_t n) { while (n) { size_t g; if (!piece(d, n, &g)) return 0; d += g; n -= g; } return 1; }
// dir 0: device <- host, 1: host <- device
static int xfer(u64 d, char* h, size_t n, int dir) {
  if (!covered(d, n)) return 0;
  while (n) { size_t g; char* x = piece(d, n, &g); if (dir == 0) memmove(x, h, g); else memmove(h, x, g); d += g; h += g; n -= g; }
  return 1;
}
static void add(u64 d, size_t len, char* h, int kind) { pthread_mutex_lock(&mu); ents[nents++] = (struct ent){d, len, h, kind}; pthread_mutex_unlock(&mu); }
static int del(u64 d, int kind) {
  pthread_mutex_lock(&mu); int f = 0;
  for (int i = 0; i < nents; i++) if (ents[i].dev == d && ents[i].kind == kind) { ents[i] = ents[--nents]; f = 1; break; }
  pthread_mutex_unlock(&mu); return f;
}
static int overlaps(u64 d, size_t len) {
  pthread_mutex_lock(&mu); int f = 0;
  for (int i = 0; i < nents; i++) if (d < ents[i].dev + ents[i].len && ents[i].dev < d + len) f = 1;
  pthread_mutex_unlock(&mu); return f;
}

CUresult cuInit(unsigned f) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int o) { if (o != 0) return 101; *d = 0; return OK; }
static int ctx_obj; static __thread void* cur;
CUresult cuDevicePrimaryCtxRetain(void** c, int d) { *c = &ctx_obj; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int d) { return OK; }
CUresult cuCtxGetCurrent(void** c) { *c = cur; return OK; }
CUresult cuCtxSetCurrent(void* c) { cur = c; return OK; }
CUresult cuCtxSynchronize(void) { return cur ? OK : 201; }
CUresult cuDeviceGetName(char* n, int len, int d) { snprintf(n, len, "Fake GPU"); return OK; }
CUresult cuDeviceTotalMem_v2(size_t* t, int d) { *t = 8ull << 30; return OK; }
CUresult cuMemGetInfo_v2(size_t* f, size_t* t) { if (!cur) return 201; *f = 7ull << 30; *t = 8ull << 30; return OK; }
CUresult cuDeviceGetAttribute(int* v, int a, int d) {
  switch (a) { case 75: *v = 9; break; case 76: *v = 0; break; case 16: *v = 132; break; case 33: *v = 0x1b; break;
    case 88: *v = 0; break; default: *v = 1; }
  return OK;
}
CUresult cuGetErrorString(CUresult r, const char** s) { static char b[64]; snprintf(b, 64, "fake error %d", r); *s = b; return OK; }
CUresult cuMemGetAllocationGranularity(size_t* g, const void* p, int o) { *g = MB2; return OK; }

CUresult cuMemAddressReserve(u64* p, size_t size, size_t align, u64 hint, u64 flags) {
  if (size % MB2 || !size) return INVALID_VALUE;
  char* m = mmap((void*)hint, size + MB2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return OOM;
  u64 a = ((u64)m + MB2 - 1) & ~(MB2 - 1);
  if (hint && (u64)m == hint) a = hint;
  if (a > (u64)m) munmap(m, a - (u64)m);
  if ((u64)m + size + MB2 > a + size) munmap((void*)(a + size), (u64)m + size + MB2 - (a + size));
  pthread_mutex_lock(&mu); resv[nres++] = (struct res){a, size}; pthread_mutex_unlock(&mu);
  *p = a; return OK;
}
// The real driver allows both of these and defers the work; hetmem-cuda promises never to do
// them (it unmaps before it releases or frees), so the fake stops on them.
static void order_violation(const char* what) { fprintf(stderr, "fakecuda: %s\n", what); abort(); }
CUresult cuMemAddressFree(u64 p, size_t size) {
  pthread_mutex_lock(&mu); int f = -1;
  for (int i = 0; i < nres; i++) if (resv[i].ptr == p && resv[i].size == size) f = i;
  if (f >= 0) resv[f] = resv[--nres];
  pthread_mutex_unlock(&mu);
  if (f < 0) return INVALID_VALUE;
  if (overlaps(p, size)) order_violation("cuMemAddressFree of a range with chunks still mapped");
  munmap((void*)p, size);
  return OK;
}
struct handle { char* mem; size_t size; };
CUresult cuMemCreate(u64* h, size_t size, const void* prop, u64 flags) {
  if (size % MB2 || !size) return INVALID_VALUE;
  struct handle* x = calloc(1, sizeof *x); x->mem = aligned_alloc(4096, size); memset(x->mem, 0x5a, size); x->size = size;
  *h = (u64)x; return OK;
}
CUresult cuMemRelease(u64 h) {
  struct handle* x = (struct handle*)h;
  pthread_mutex_lock(&mu); int mapped = 0;
  for (int i = 0; i < nents; i++) if (ents[i].kind == 1 && ents[i].host == x->mem) mapped = 1;
  pthread_mutex_unlock(&mu);
  if (mapped) order_violation("cuMemRelease of memory that is still mapped");
  free(x->mem); free(x); return OK;
}
CUresult cuMemMap(u64 p, size_t size, size_t off, u64 h, u64 flags) {
  struct handle* x = (struct handle*)h;
  if (size != x->size || off) return INVALID_VALUE;
  int inres = 0; pthread_mutex_lock(&mu);
  for (int i = 0; i < nres; i++) if (p >= resv[i].ptr && p + size <= resv[i].ptr + resv[i].size) inres = 1;
  pthread_mutex_unlock(&mu);
  if (!inres || overlaps(p, size)) return INVALID_VALUE;
  add(p, size, x->mem, 1);  // the memory stays with the handle; cuMemRelease frees it
  return OK;
}
CUresult cuMemUnmap(u64 p, size_t size) {
  pthread_mutex_lock(&mu); int f = -1;
  for (int i = 0; i < nents; i++) if (ents[i].dev == p && ents[i].len == size && ents[i].kind == 1) f = i;
  if (f >= 0) ents[f] = ents[--nents];
  pthread_mutex_unlock(&mu);
  if (f < 0) return INVALID_VALUE;
  return OK;
}
CUresult cuMemSetAccess(u64 p, size_t size, const void* d, size_t n) { return covered(p, size) ? OK : INVALID_VALUE; }

CUresult cuMemHostRegister_v2(void* p, size_t n, unsigned f) {
  if (overlaps((u64)p, n)) return ALREADY_REGISTERED;
  volatile char* c = p; for (size_t i = 0; i < n; i += 4096) (void)c[i];
  add((u64)p, n, p, 2); return OK;
}
CUresult cuMemHostUnregister(void* p) { return del((u64)p, 2) ? OK : NOT_REGISTERED; }
CUresult cuMemHostGetDevicePointer_v2(u64* d, void* p, unsigned f) { if (!tr((u64)p, 1)) return INVALID_VALUE; *d = (u64)p; return OK; }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned f) { *p = aligned_alloc(4096, (n + 4095) & ~4095ull); add((u64)*p, n, *p, 3); return OK; }
CUresult cuMemFreeHost(void* p) { del((u64)p, 3); free(p); return OK; }
CUresult cuMemAllocManaged(u64* d, size_t n, unsigned f) { void* p = aligned_alloc(4096, (n + 4095) & ~4095ull); add((u64)p, n, p, 4); *d = (u64)p; return OK; }
CUresult cuMemFree_v2(u64 d) { if (!del(d, 4)) return INVALID_VALUE; free((void*)d); return OK; }
typedef struct { unsigned type; int id; } Loc;
CUresult cuMemPrefetchAsync_v2(u64 d, size_t n, Loc l, unsigned f, void* s) { return tr(d, n) ? OK : INVALID_VALUE; }

CUresult cuStreamCreate(void** s, unsigned f) { *s = malloc(8); return OK; }
CUresult cuStreamDestroy_v2(void* s) { free(s); return OK; }
CUresult cuStreamSynchronize(void* s) { return OK; }
CUresult cuStreamQuery(void* s) { return OK; }
CUresult cuStreamWaitEvent(void* s, void* e, unsigned f) { return OK; }
// An event is the status it reports once complete: OK, or the error the test hook put there.
static int fail_next_event;
void fakecuda_fail_next_event(void) { pthread_mutex_lock(&mu); fail_next_event = 1; pthread_mutex_unlock(&mu); }
CUresult cuEventCreate(void** e, unsigned f) { int* x = malloc(sizeof *x); *x = OK; *e = x; return OK; }
CUresult cuEventRecord(void* e, void* s) {
  pthread_mutex_lock(&mu); *(int*)e = fail_next_event ? ILLEGAL_ADDRESS : OK; fail_next_event = 0; pthread_mutex_unlock(&mu);
  return OK;
}
CUresult cuEventQuery(void* e) {  // NOT_READY two times in three
  static int n;
  if (__atomic_add_fetch(&n, 1, __ATOMIC_RELAXED) % 3) return NOT_READY;
  pthread_mutex_lock(&mu); int r = *(int*)e; pthread_mutex_unlock(&mu); return r;
}
CUresult cuEventSynchronize(void* e) { pthread_mutex_lock(&mu); int r = *(int*)e; pthread_mutex_unlock(&mu); return r; }
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { *ms = 0.001f; return OK; }
CUresult cuEventDestroy_v2(void* e) { free(e); return OK; }

CUresult cuMemcpyHtoDAsync_v2(u64 d, const void* h, size_t n, void* s) { return xfer(d, (char*)h, n, 0) ? OK : INVALID_VALUE; }
CUresult cuMemcpyDtoHAsync_v2(void* h, u64 d, size_t n, void* s) { return xfer(d, h, n, 1) ? OK : INVALID_VALUE; }
CUresult cuMemcpyDtoDAsync_v2(u64 d, u64 sr, size_t n, void* s) {
  if (!covered(d, n) || !covered(sr, n)) return INVALID_VALUE;
  char* tmp = malloc(n); xfer(sr, tmp, n, 1); xfer(d, tmp, n, 0); free(tmp); return OK;
}
CUresult cuMemsetD8Async(u64 d, unsigned char v, size_t n, void* s) {
  if (!covered(d, n)) return INVALID_VALUE;
  char* tmp = malloc(n); memset(tmp, v, n); xfer(d, tmp, n, 0); free(tmp); return OK;
}
// Kernels work on a gathered copy of a device range, scattered back after.
static char* gather(u64 d, size_t n) { if (!covered(d, n)) return NULL; char* t = malloc(n ? n : 1); xfer(d, t, n, 1); return t; }
static void scatter(u64 d, char* t, size_t n) { xfer(d, t, n, 0); free(t); }

struct module { int ptx; };
CUresult cuModuleLoadDataEx(void** m, const void* image, unsigned n, int* opts, void** vals) {
  const char* s = image;
  if (memcmp(s, "\x7f" "ELF", 4) != 0) {
    const char* v = strstr(s, ".version ");
    if (!v) return INVALID_IMAGE;
    double ver = atof(v + 9);
    if (ver > 9.0) { if (n >= 1) snprintf(vals[0], 100, "ptxas fatal: Unsupported .version %.1f", ver); return UNSUPPORTED_PTX; }
    if (strstr(s, "this is not ptx")) { if (n >= 1) snprintf(vals[0], 100, "ptxas: syntax error"); return INVALID_PTX; }
  }
  *m = calloc(1, sizeof(struct module)); return OK;
}
CUresult cuModuleUnload(void* m) { free(m); return OK; }
static const char* known[] = {"hetmem_empty", "hetmem_add_u8", "hetmem_fill_u32", "hetmem_sum_u64", "hetmem_write_u64", "hetmem_walk_list", "hetmem_row_stencil", "hetmem_touch_random", "axpb", "k"};
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
  for (unsigned i = 0; i < sizeof known / sizeof *known; i++) if (!strcmp(name, known[i])) { *f = (void*)known[i]; return OK; }
  return NOT_FOUND;
}
#define P(i, T) (*(T*)params[i])
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned sh, void* s, void** params, void** extra) {
  const char* n = f;
  if (bx * by * bz > 1024) return 701;
  if (!strcmp(n, "hetmem_empty")) return OK;
  if (!strcmp(n, "hetmem_add_u8")) { u64 cnt = P(1, u64); unsigned char* p = (unsigned char*)gather(P(0, u64), cnt); if (!p) return 700; unsigned char v = P(2, unsigned char); for (u64 i = 0; i < cnt; i++) p[i] += v; scatter(P(0, u64), (char*)p, cnt); return OK; }
  if (!strcmp(n, "hetmem_fill_u32")) { u64 cnt = P(1, u64); unsigned* p = (unsigned*)gather(P(0, u64), cnt * 4); if (!p) return 700; for (u64 i = 0; i < cnt; i++) p[i] = P(2, unsigned) + (unsigned)i; scatter(P(0, u64), (char*)p, cnt * 4); return OK; }
  if (!strcmp(n, "hetmem_sum_u64")) { u64 cnt = P(1, u64); u64* p = (u64*)gather(P(0, u64), cnt * 8); u64* o = (u64*)tr(P(2, u64), 8); if (!p || !o) return 700; u64 sum = 0; for (u64 i = 0; i < cnt; i++) sum += p[i]; *o += sum; free(p); return OK; }
  if (!strcmp(n, "hetmem_write_u64")) { u64 cnt = P(1, u64); u64* p = (u64*)gather(P(0, u64), cnt * 8); if (!p) return 700; for (u64 i = 0; i < cnt; i++) p[i] = P(2, u64); scatter(P(0, u64), (char*)p, cnt * 8); return OK; }
  if (!strcmp(n, "hetmem_walk_list")) {
    u64 c = 0; u64 node = P(0, u64);
    while (node) { u64* nd = (u64*)tr(node, 24); if (!nd) return 700; u64* out = (u64*)tr(nd[2], 8); if (!out) return 700; *out = nd[1] * 2 + 1; nd[1] += 1; c++; node = nd[0]; }
    u64* cnt = (u64*)tr(P(1, u64), 8); if (!cnt) return 700; *cnt = c; return OK;
  }
  if (!strcmp(n, "hetmem_row_stencil")) {
    u64 nrows = P(1, u64), first = P(2, u64); unsigned iter = P(3, unsigned);
    unsigned* p = (unsigned*)gather(P(0, u64), nrows * 4096); if (!p) return 700;
    for (u64 r = 0; r < nrows; r++) {
      unsigned old[1024], *row = p + r * 1024; memcpy(old, row, sizeof old);
      unsigned salt = (unsigned)(first + r) * 0x01000193u ^ iter * 0x9E3779B9u;
      for (unsigned j = 0; j < 1024; j++) { unsigned l = old[(j + 1023) & 1023], c = old[j], rr = old[(j + 1) & 1023]; row[j] = c * 3u + (l ^ ((rr << 7) | (rr >> 25))) + salt; }
    }
    scatter(P(0, u64), (char*)p, nrows * 4096); return OK;
  }
  if (!strcmp(n, "hetmem_touch_random")) {
    // The same sequence as kernels.cu, thread by thread over a 1-D grid; each read translated
    // on its own, so a range need not be one entry and a read outside the mapped ones fails.
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) return INVALID_VALUE;
    u64 p = P(0, u64), pages = P(1, u64) >> 9, touches = P(2, u64), seed = P(3, u64), threads = (u64)gx * bx, sum = 0;
    u64* o = (u64*)tr(P(4, u64), 8); if (!o) return 700;
    if (pages == 0) return OK;
    for (u64 t = 0; t < threads && t < touches; t++) {
      u64 z = seed + t + 0x9E3779B97F4A7C15ull;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      u64 x = (z ^ (z >> 31)) | 1;
      for (u64 i = t; i < touches; i += threads) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        u64* w = (u64*)tr(p + 8 * ((x % pages) * 512 + (x >> 55)), 8); if (!w) return 700;
        sum += *w;
      }
    }
    *o += sum; return OK;
  }
  if (!strcmp(n, "axpb")) { u64 cnt = P(1, u64); float* x = (float*)gather(P(0, u64), cnt * 4); if (!x) return 700; for (u64 i = 0; i < cnt; i++) x[i] = x[i] * P(2, float) + P(3, float); scatter(P(0, u64), (char*)x, cnt * 4); return OK; }
  return 98;
}
