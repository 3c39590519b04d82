// Kernels for hetmem-cuda's tests and probe. `kernels.ptx` beside this file is generated from it by
// `scripts/gen-ptx.sh` (NVRTC 13.0, compute_75, so that a CUDA 13.0 driver loads it); do not edit
// the PTX by hand. No headers: NVRTC compiles this without the CUDA toolkit's include files.

// Does nothing: launch overhead.
extern "C" __global__ void hetmem_empty() {}

// p[i] += v for i < n (grid-stride).
extern "C" __global__ void hetmem_add_u8(unsigned char* p, unsigned long long n, unsigned char v) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    p[i] = (unsigned char)(p[i] + v);
}

// p[i] = v + i for i < n (grid-stride).
extern "C" __global__ void hetmem_fill_u32(unsigned int* p, unsigned long long n, unsigned int v) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    p[i] = v + (unsigned int)i;
}

// *out += sum of p[0..n) (grid-stride, one atomic per thread).
extern "C" __global__ void hetmem_sum_u64(const unsigned long long* p, unsigned long long n,
                                          unsigned long long* out) {
  unsigned long long s = 0;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    s += p[i];
  atomicAdd(out, s);
}

// p[i] = v for i < n (grid-stride).
extern "C" __global__ void hetmem_write_u64(unsigned long long* p, unsigned long long n,
                                            unsigned long long v) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    p[i] = v;
}

// A linked structure built by the CPU, with pointers that are CPU addresses. One thread walks it:
// for each node, *out = value * 2 + 1 and value += 1; then *count = the number of nodes.
struct HetmemNode {
  HetmemNode* next;
  unsigned long long value;
  unsigned long long* out;
};
extern "C" __global__ void hetmem_walk_list(HetmemNode* head, unsigned long long* count) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  unsigned long long c = 0;
  for (HetmemNode* n = head; n != 0; n = n->next) {
    *n->out = n->value * 2 + 1;
    n->value += 1;
    c++;
  }
  *count = c;
}
