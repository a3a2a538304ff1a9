// Patch embedding's im2col (timm PatchEmbed: conv with kernel = stride = p), f32.
// CPU reference: snella_core::ops::patch::im2col. There is no backward: the images are inputs
// and the patch-embedding weights are frozen, so no gradient flows into the image.
#include "common.cuh"

// cols[bi·np + py·gw + px, c·p² + ky·p + kx] = images[bi, c, py·p + ky, px·p + kx] for
// images [b, ch, h, w] (NCHW), gh = h/p, gw = w/p, np = gh·gw, k = ch·p²; one thread per output
// element (grid-stride), writes coalesced. Trailing pixels beyond gh·p / gw·p are dropped.
extern "C" __global__ void snella_im2col(const float* __restrict__ images, float* __restrict__ cols, unsigned b,
                                        unsigned ch, unsigned h, unsigned w, unsigned p) {
  unsigned gh = h / p, gw = w / p;
  unsigned long long np = (unsigned long long)gh * gw;
  unsigned long long k = (unsigned long long)ch * p * p;
  unsigned long long total = (unsigned long long)b * np * k;
  unsigned pp = p * p;
  for (unsigned long long o = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; o < total;
       o += (unsigned long long)gridDim.x * blockDim.x) {
    unsigned long long row = o / k;
    unsigned col = (unsigned)(o - row * k);
    unsigned long long bi = row / np;
    unsigned pi = (unsigned)(row - bi * np);
    unsigned py = pi / gw, px = pi - py * gw;
    unsigned c = col / pp, r = col - c * pp;
    unsigned ky = r / p, kx = r - ky * p;
    cols[o] = images[((bi * ch + c) * h + py * p + ky) * (unsigned long long)w + px * p + kx];
  }
}
