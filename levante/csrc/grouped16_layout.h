// The 16-row group layouts (Grouped16Weight in Python, type ids 10-14): a weight's GGML blocks regrouped once
// at load, per 16 rows and column block, into the same bytes moved so that one int32 lane holds one row.
// This file: the layouts, the lane codecs between a row's GGML block and its lane of a group block, and the
// exact dequantization of grouped weights. The GEMV kernels on them are in grouped16.h.
//
// Q4_0x16: per group of 16 rows and per 32-column block, the 16 rows' f16 scales (32 bytes), then their codes
// as four 64-byte vectors: vector kk, int32 lane j = row j's codes 8kk..8kk+7 as bytes [c0 | c4 << 4,
// c1 | c5 << 4, c2 | c6 << 4, c3 | c7 << 4] (pack8b), so v & 0x0F.. gives codes 0-3 and (v >> 4) & 0x0F.. codes
// 4-7 of all 16 rows as bytes. The same 288 bytes as the 16 GGML blocks, only moved. The GEMV runs vpdpbusd
// on 16 rows at once with a broadcast 4 bytes of x (x as int16 in two bytes: two vpdpbusd per 4 codes), and
// a block's scales are one vector for the 16 rows (benchmarks/grouped16.py).
//
// The Q4_0x16 idea for the K types: per group of 16 rows and per 256 columns, the same bytes as the 16 GGML
// superblocks, moved so that one int32 lane holds one row. vpdpwssd then sums a sub-block of 16 rows at once
// in int32 (exact), and the sub-block scales are applied in f32 per 16 rows (one FMA), where the per-row
// kernels spend a vpmullw on every 32 codes.
// Q4_Kx16 (2304 bytes): d[16] f16 | dmin[16] f16 | 3 x 64 bytes: lane j = packed scale bytes 4u..4u+3 of
// row j | 32 x 64 bytes: vector kk, lane j = row j's codes 8kk..8kk+7 (pack8b order: as bytes for vpdpbusd).
// Q6_Kx16 (3360 bytes): d[16] f16 | 4 x 64 bytes: lane j = int8 scales 4v..4v+3 of row j | per 16-element
// sub-block s: two code vectors (low nibbles, pack8b order) and one vector of the high bits (lane j: code e's
// two bits in byte e % 4 at bits 2 (e / 4)), so codes 4g..4g+3 come out as bytes with an AND, a shift and
// a ternary-logic op, read with vpdpbusd as Q4_Kx16.
// Q5_Kx16 (2816 bytes): as Q4_Kx16, but the codes in pack8 order and per sub-block the four code vectors are
// followed by one vector of the fifth bits (lane j: element 2P's bit at bit P, element 2P+1's at bit 16 + P).
// Q4_1x16 (320 bytes): d[16] f16 | m[16] f16 | the codes as Q4_0x16's.
// Q8_0x16 (544 bytes): d[16] f16 | 8 x 64 bytes: vector kk, lane j = row j's codes 4kk .. 4kk+3 as bytes
// [c0 c2 c1 c3], so the int16 words' low and high bytes are the pairs (c0, c1) and (c2, c3).
#pragma once

#include "dequant.h"

#ifdef HAVE_BF16DOT
namespace levante {

// 8 nibbles -> [c0 c2 c4 c6 | c1 c3 c5 c7]: (v >> 4s) & 0x000F000F is the int16 pair (c_2s, c_2s+1)
inline uint32_t pack8(const uint8_t* c) {
  return (uint32_t)c[0] | (uint32_t)c[2] << 4 | (uint32_t)c[4] << 8 | (uint32_t)c[6] << 12 | (uint32_t)c[1] << 16 |
         (uint32_t)c[3] << 20 | (uint32_t)c[5] << 24 | (uint32_t)c[7] << 28;
}
// 8 codes -> [c0 | c4 << 4, c1 | c5 << 4, c2 | c6 << 4, c3 | c7 << 4]: one AND gives c0..c3 as bytes, a shift
// and an AND c4..c7 (Q4_Kx16, read with vpdpbusd)
inline uint32_t pack8b(const uint8_t* c) {
  uint32_t d = 0;
  for (int b = 0; b < 4; ++b) d |= (uint32_t)(c[b] | c[b + 4] << 4) << (8 * b);
  return d;
}
inline void unpack8b(uint32_t d, uint8_t* c) {
  for (int b = 0; b < 4; ++b) {
    c[b] = (d >> (8 * b)) & 15;
    c[b + 4] = (d >> (8 * b + 4)) & 15;
  }
}
inline void unpack8(uint32_t d, uint8_t* c) {
  for (int t = 0; t < 4; ++t) {
    c[2 * t] = (d >> (4 * t)) & 15;
    c[2 * t + 1] = (d >> (16 + 4 * t)) & 15;
  }
}

// one row's GGML superblock <-> its 256 codes in element order
inline void q4k_get(const uint8_t* b, uint8_t* q) {
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 32; ++i) {
      q[64 * p + i] = b[16 + 32 * p + i] & 15;
      q[64 * p + 32 + i] = b[16 + 32 * p + i] >> 4;
    }
}
inline void q4k_put(const uint8_t* q, uint8_t* b) {
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 32; ++i) b[16 + 32 * p + i] = (uint8_t)(q[64 * p + i] | q[64 * p + 32 + i] << 4);
}
// Q6_K element e = g*128 + s*64 + h*32 + j: low nibble (shift 4s) of ql[g*64 + h*32 + j], high bits
// (shift 2*(2s+h)) of qh[g*32 + j] (as deq_q6_k)
inline void q6k_get(const uint8_t* b, uint8_t* q) {
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 32; ++j)
          q[g * 128 + s * 64 + h * 32 + j] = (uint8_t)(((b[g * 64 + h * 32 + j] >> (4 * s)) & 15) |
                                                       (((b[128 + g * 32 + j] >> (2 * (2 * s + h))) & 3) << 4));
}
inline void q6k_put(const uint8_t* q, uint8_t* b) {
  std::memset(b, 0, 192);
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 32; ++j) {
          const uint8_t v = q[g * 128 + s * 64 + h * 32 + j];
          b[g * 64 + h * 32 + j] |= (uint8_t)((v & 15) << (4 * s));
          b[128 + g * 32 + j] |= (uint8_t)((v >> 4) << (2 * (2 * s + h)));
        }
}

// row j's GGML block (base type) <-> lane j of a group block (grouped type); `to` selects the direction
template <bool TO>
void lane_x16(const uint8_t* blk, uint8_t* dst, int j) {  // Q4_0: 18 <-> 288 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[32];
  if (TO) {
    std::memcpy(dst + 2 * j, b, 2);
    for (int i = 0; i < 16; ++i) q[i] = b[2 + i] & 15, q[i + 16] = b[2 + i] >> 4;
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t d = pack8b(q + 8 * kk);
      std::memcpy(dst + 32 + 64 * kk + 4 * j, &d, 4);
    }
  } else {
    std::memcpy(b, dst + 2 * j, 2);
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t d;
      std::memcpy(&d, dst + 32 + 64 * kk + 4 * j, 4);
      unpack8b(d, q + 8 * kk);
    }
    for (int i = 0; i < 16; ++i) b[2 + i] = (uint8_t)(q[i] | q[i + 16] << 4);
  }
}
template <bool TO>
void lane_x41(const uint8_t* blk, uint8_t* dst, int j) {  // Q4_1: 20 <-> 320 bytes (d[16], m[16], the codes)
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[32];
  if (TO) {
    std::memcpy(dst + 2 * j, b, 2);
    std::memcpy(dst + 32 + 2 * j, b + 2, 2);
    for (int i = 0; i < 16; ++i) q[i] = b[4 + i] & 15, q[i + 16] = b[4 + i] >> 4;
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t d = pack8b(q + 8 * kk);
      std::memcpy(dst + 64 + 64 * kk + 4 * j, &d, 4);
    }
  } else {
    std::memcpy(b, dst + 2 * j, 2);
    std::memcpy(b + 2, dst + 32 + 2 * j, 2);
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t d;
      std::memcpy(&d, dst + 64 + 64 * kk + 4 * j, 4);
      unpack8b(d, q + 8 * kk);
    }
    for (int i = 0; i < 16; ++i) b[4 + i] = (uint8_t)(q[i] | q[i + 16] << 4);
  }
}
template <bool TO>
void lane_x4k(const uint8_t* blk, uint8_t* dst, int j) {  // Q4_K: 144 <-> 2304 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b, 2);
  mv(dst + 32 + 2 * j, b + 2, 2);
  for (int u = 0; u < 3; ++u) mv(dst + 64 + 64 * u + 4 * j, b + 4 + 4 * u, 4);
  if (TO) {
    q4k_get(b, q);
    for (int kk = 0; kk < 32; ++kk) {
      const uint32_t d = pack8b(q + 8 * kk);
      std::memcpy(dst + 256 + 64 * kk + 4 * j, &d, 4);
    }
  } else {
    for (int kk = 0; kk < 32; ++kk) {
      uint32_t d;
      std::memcpy(&d, dst + 256 + 64 * kk + 4 * j, 4);
      unpack8b(d, q + 8 * kk);
    }
    q4k_put(q, b);
  }
}
// Q6_Kx16: the high two bits of a sub-block's code e sit in byte e % 4 of the lane, at bits 2 (e / 4)
#define Q6HI(e) (8 * ((e) % 4) + 2 * ((e) / 4))
template <bool TO>
void lane_x6k(const uint8_t* blk, uint8_t* dst, int j) {  // Q6_K: 210 <-> 3360 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b + 208, 2);
  for (int v = 0; v < 4; ++v) mv(dst + 32 + 64 * v + 4 * j, b + 192 + 4 * v, 4);
  if (TO) q6k_get(b, q);
  for (int s = 0; s < 16; ++s) {
    uint8_t* o = dst + 288 + 192 * s;
    uint8_t* c = q + 16 * s;
    if (TO) {
      uint8_t lo[16];
      uint32_t hi = 0;
      for (int e = 0; e < 16; ++e) {
        lo[e] = c[e] & 15;
        hi |= (uint32_t)(c[e] >> 4) << Q6HI(e);
      }
      const uint32_t d0 = pack8b(lo), d1 = pack8b(lo + 8);
      std::memcpy(o + 4 * j, &d0, 4);
      std::memcpy(o + 64 + 4 * j, &d1, 4);
      std::memcpy(o + 128 + 4 * j, &hi, 4);
    } else {
      uint32_t d0, d1, hi;
      std::memcpy(&d0, o + 4 * j, 4);
      std::memcpy(&d1, o + 64 + 4 * j, 4);
      std::memcpy(&hi, o + 128 + 4 * j, 4);
      unpack8b(d0, c);
      unpack8b(d1, c + 8);
      for (int e = 0; e < 16; ++e) c[e] |= (uint8_t)(((hi >> Q6HI(e)) & 3) << 4);
    }
  }
  if (!TO) q6k_put(q, b);
}

template <bool TO>
void lane_x5k(const uint8_t* blk, uint8_t* dst, int j) {  // Q5_K: 176 <-> 2816 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b, 2);
  mv(dst + 32 + 2 * j, b + 2, 2);
  for (int u = 0; u < 3; ++u) mv(dst + 64 + 64 * u + 4 * j, b + 4 + 4 * u, 4);
  // element 32 s + e: low nibble (shift 4 (s & 1)) of qs[32 (s >> 1) + e], fifth bit (shift s) of qh[e]
  if (TO)
    for (int s = 0; s < 8; ++s)
      for (int e = 0; e < 32; ++e)
        q[32 * s + e] = (uint8_t)(((b[48 + 32 * (s >> 1) + e] >> (4 * (s & 1))) & 15) | (((b[16 + e] >> s) & 1) << 4));
  for (int s = 0; s < 8; ++s) {
    uint8_t* o = dst + 256 + 320 * s;
    uint8_t* c = q + 32 * s;
    if (TO) {
      uint8_t lo[32];
      uint32_t hi = 0;
      for (int e = 0; e < 32; ++e) {
        lo[e] = c[e] & 15;
        hi |= (uint32_t)(c[e] >> 4) << ((e & 1) * 16 + (e >> 1));
      }
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t d = pack8(lo + 8 * kk);
        std::memcpy(o + 64 * kk + 4 * j, &d, 4);
      }
      std::memcpy(o + 256 + 4 * j, &hi, 4);
    } else {
      uint32_t hi;
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t d;
        std::memcpy(&d, o + 64 * kk + 4 * j, 4);
        unpack8(d, c + 8 * kk);
      }
      std::memcpy(&hi, o + 256 + 4 * j, 4);
      for (int e = 0; e < 32; ++e) c[e] |= (uint8_t)(((hi >> ((e & 1) * 16 + (e >> 1))) & 1) << 4);
    }
  }
  if (!TO) {
    std::memset(b + 16, 0, 160);
    for (int s = 0; s < 8; ++s)
      for (int e = 0; e < 32; ++e) {
        b[48 + 32 * (s >> 1) + e] |= (uint8_t)((q[32 * s + e] & 15) << (4 * (s & 1)));
        b[16 + e] |= (uint8_t)((q[32 * s + e] >> 4) << s);
      }
  }
}
template <bool TO>
void lane_x80(const uint8_t* blk, uint8_t* dst, int j) {  // Q8_0: 34 <-> 544 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  static constexpr int ORD[4] = {0, 2, 1, 3};  // byte t of a lane holds code ORD[t]
  if (TO)
    std::memcpy(dst + 2 * j, b, 2);
  else
    std::memcpy(b, dst + 2 * j, 2);
  for (int kk = 0; kk < 8; ++kk)
    for (int t = 0; t < 4; ++t) {
      uint8_t* g = dst + 32 + 64 * kk + 4 * j + t;
      uint8_t* r = b + 2 + 4 * kk + ORD[t];
      if (TO)
        *g = *r;
      else
        *r = *g;
    }
}

inline int64_t base_of(int64_t qt) {
  switch (qt) {
    case X16: return 0;
    case X41: return 1;
    case X4K: return 7;
    case X6K: return 9;
    case X5K: return 8;
    default: return 4;
  }
}

typedef void (*lane_fn)(const uint8_t*, uint8_t*, int);
// a grouped type's lane codec (TO: GGML block -> group block) and its base type's reference dequantizer
template <bool TO>
lane_fn lane_of(int64_t qt) {
  switch (qt) {
    case X16: return lane_x16<TO>;
    case X41: return lane_x41<TO>;
    case X4K: return lane_x4k<TO>;
    case X6K: return lane_x6k<TO>;
    case X5K: return lane_x5k<TO>;
    default: return lane_x80<TO>;
  }
}
inline deq_fn base_deq(int64_t qt) {
  switch (qt) {
    case X16: return V(deq_q4_0);
    case X41: return V(deq_q4_1);
    case X4K: return V(deq_q4_k);
    case X6K: return V(deq_q6_k);
    case X5K: return V(deq_q5_k);
    default: return V(deq_q8_0);
  }
}

// row r of a grouped weight -> float32 dst[0, k), through the row's GGML blocks and the reference dequantizer
inline void grouped_row(const uint8_t* src, int64_t qt, int64_t r, float* dst, int64_t k) {
  const int64_t bl = BLK[qt], nb = k / bl, gy = BYT[qt];
  const lane_fn lane = lane_of<false>(qt);
  const deq_fn deq = base_deq(qt);
  alignas(64) uint8_t blk[256];
  for (int64_t b = 0; b < nb; ++b) {
    lane(blk, const_cast<uint8_t*>(src) + ((r / 16) * nb + b) * gy, (int)(r % 16));
    deq(blk, dst + b * bl);
  }
}

// rows ids of the grouped weight (groups [ng, ...]) -> float32 [n_ids, k]
inline void dequant_grouped_rows(const uint8_t* src, int64_t qt, const int64_t* ids, int64_t n, float* dst, int64_t k) {
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) grouped_row(src, qt, ids[i], dst + i * k, k);
  });
}

// groups [0, ng) -> float32 rows (row stride k)
inline void dequant_grouped(const uint8_t* src, int64_t qt, float* dst, int64_t ng, int64_t k) {
  at::parallel_for(0, 16 * ng, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) grouped_row(src, qt, r, dst + r * k, k);
  });
}

// GGML rows [N, k / BL * BY] <-> groups [N / 16, k / BL * 16 BY] (TO: rows -> groups)
template <bool TO>
void regroup(uint8_t* rows, uint8_t* groups, int64_t qt, int64_t ng, int64_t k) {
  const int64_t bt = base_of(qt), nb = k / BLK[bt], by = BYT[bt], gy = BYT[qt];
  const lane_fn f = lane_of<TO>(qt);
  at::parallel_for(0, ng, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b)
        for (int j = 0; j < 16; ++j) f(rows + ((g * 16 + j) * nb + b) * by, groups + (g * nb + b) * gy, j);
  });
}

}  // namespace levante
#endif  // HAVE_BF16DOT
