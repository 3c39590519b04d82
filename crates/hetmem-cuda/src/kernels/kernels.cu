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

// The demo's device pass (`hetmem demo --device cuda`): a 3-point horizontal stencil with
// wrap-around inside each row of 1024 u32 (one 4 KiB page), for `nrows` rows starting at row
// `first_row` of the grid. One thread block per row (grid-stride over rows), 1024 threads or fewer;
// the old row is read into shared memory first, so the update is in place. The same arithmetic
// as the CLI's `device_row`: new[j] = old[j] * 3 + (old[j-1] ^ rotl(old[j+1], 7)) + salt, with
// salt = row * 0x01000193 ^ iter * 0x9E3779B9, all modulo 2^32.
extern "C" __global__ void hetmem_row_stencil(unsigned int* rows, unsigned long long nrows,
                                              unsigned long long first_row, unsigned int iter) {
  __shared__ unsigned int old[1024];
  for (unsigned long long r = blockIdx.x; r < nrows; r += gridDim.x) {
    unsigned int* row = rows + r * 1024;
    for (unsigned int j = threadIdx.x; j < 1024; j += blockDim.x) old[j] = row[j];
    __syncthreads();
    unsigned int salt =
        (unsigned int)(first_row + r) * 0x01000193u ^ iter * 0x9E3779B9u;
    for (unsigned int j = threadIdx.x; j < 1024; j += blockDim.x) {
      unsigned int l = old[(j + 1023) & 1023];
      unsigned int c = old[j];
      unsigned int rr = old[(j + 1) & 1023];
      row[j] = c * 3u + (l ^ ((rr << 7) | (rr >> 25))) + salt;
    }
    __syncthreads();
  }
}

// Random 4 KiB-page touches (the CUDA bench's row 5): thread t of T (gridDim.x * blockDim.x)
// makes touches t, t + T, ... < `touches`, each one 8-byte read of a random page of p's
// `words` (whole 512-word pages; a remainder is never read): a xorshift64 state seeded from
// splitmix64(seed + t) (forced odd, so never 0) steps once per touch; the page is x % pages and
// the word in it x >> 55 (9 bits). One atomicAdd of the thread's sum into *out. The fake driver
// and the bench's CPU check replay the same sequence.
extern "C" __global__ void hetmem_touch_random(const unsigned long long* p, unsigned long long words,
                                               unsigned long long touches, unsigned long long seed,
                                               unsigned long long* out) {
  unsigned long long pages = words >> 9;
  if (pages == 0) return;
  unsigned long long t = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned long long z = seed + t + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  unsigned long long x = (z ^ (z >> 31)) | 1;
  unsigned long long s = 0;
  for (unsigned long long i = t; i < touches; i += stride) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s += p[(x % pages) * 512 + (x >> 55)];
  }
  if (s != 0) atomicAdd(out, s);
}
