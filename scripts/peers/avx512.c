/* Does this CPU (and kernel) run the AVX-512 instructions llama.cpp would use?
 * Built and run by scripts/bench-peers with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512cd;
 * a machine that only claims them dies here with SIGILL instead of inside a benchmark.
 * Prints "ok" when every result is right. */
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile float in = 1.5f;
    __m512 a = _mm512_set1_ps(in), b = _mm512_set1_ps(2.0f);
    __m512 c = _mm512_fmadd_ps(a, b, a); /* F */
    __m512i x = _mm512_set1_epi8(3);
    __m512i y = _mm512_add_epi8(x, x); /* BW */
    __m256i z = _mm256_maskz_mov_epi32(0x0f, _mm256_set1_epi32(7)); /* VL */
    __m512d d = _mm512_cvtepi64_pd(_mm512_set1_epi64(5)); /* DQ */
    __m512i e = _mm512_lzcnt_epi32(_mm512_set1_epi32(1)); /* CD */
    float o[16];
    _mm512_storeu_ps(o, c);
    int ok = o[15] == 4.5f && _mm_cvtsi128_si32(_mm512_castsi512_si128(y)) == 0x06060606 &&
             _mm256_extract_epi32(z, 0) == 7 && _mm256_extract_epi32(z, 7) == 0 &&
             _mm512_reduce_add_pd(d) == 40.0 && _mm512_reduce_add_epi32(e) == 16 * 31;
    puts(ok ? "ok" : "wrong");
    return ok ? 0 : 1;
}
