#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}
// MODE 0: fp32 w; 1: bf16 pairs; 2: bf16 old widen (cvtepu16+slli)
template<int MI,int NJ,int MODE>
__attribute__((noinline)) void tile(const float* x, const void* wp, long K, float* out){
  __m256 acc[2][MI][NJ];
  for(int h=0;h<2;h++) for(int i=0;i<MI;i++) for(int j=0;j<NJ;j++) acc[h][i][j]=_mm256_setzero_ps();
  const uint16_t* w=(const uint16_t*)wp; const float* wf=(const float*)wp;
  for(long k=0;k<K;k+=16){
    __m256 wv[NJ];
    if(MODE==0){ for(int j=0;j<NJ;j++) wv[j]=_mm256_loadu_ps(wf+j*K+k);}
    else if(MODE==3){ for(int j=0;j<NJ;j++) {wv[j]=_mm256_loadu_ps(wf+j*K+k); __asm__("" : "+x"(wv[j]));}}
    else if(MODE==1){ for(int j=0;j<NJ;j++) wv[j]=_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(w+j*K+k)),16));}
    else { for(int j=0;j<NJ;j++) wv[j]=_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w+j*K+k))),16));}
#pragma GCC unroll 4
    for(int i=0;i<MI;i++){ __m256 xv=_mm256_loadu_ps(x+i*K+k);
#pragma GCC unroll 4
      for(int j=0;j<NJ;j++) acc[0][i][j]=_mm256_fmadd_ps(xv,wv[j],acc[0][i][j]);}
    if(MODE==0){ for(int j=0;j<NJ;j++) wv[j]=_mm256_loadu_ps(wf+j*K+k+8);}
    else if(MODE==3){ for(int j=0;j<NJ;j++) {wv[j]=_mm256_loadu_ps(wf+j*K+k+8); __asm__("" : "+x"(wv[j]));}}
    else if(MODE==1){ for(int j=0;j<NJ;j++) wv[j]=_mm256_castsi256_ps(_mm256_blend_epi16(_mm256_castps_si256(wv[j]),_mm256_loadu_si256((const __m256i*)(w+j*K+k)),0xAA));}
    else { for(int j=0;j<NJ;j++) wv[j]=_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w+j*K+k+8))),16));}
#pragma GCC unroll 4
    for(int i=0;i<MI;i++){ __m256 xv=_mm256_loadu_ps(x+i*K+k+8);
#pragma GCC unroll 4
      for(int j=0;j<NJ;j++) acc[1][i][j]=_mm256_fmadd_ps(xv,wv[j],acc[1][i][j]);}
  }
  for(int i=0;i<MI;i++) for(int j=0;j<NJ;j++){ __m256 s=_mm256_add_ps(acc[0][i][j],acc[1][i][j]); out[i*NJ+j]=s[0]+s[1]+s[7];}
}
template<int MI,int NJ,int MODE> void run(long K){
  float* x=(float*)aligned_alloc(64,MI*K*4); float* w=(float*)aligned_alloc(64,NJ*K*4+65536);
  for(long i=0;i<MI*K;i++) x[i]=1e-3f*(i%7); for(long i=0;i<NJ*K;i++) w[i]=1.0f;
  float out[64]; long reps=40000000/K*16/ (MI*NJ) ; double t0=now();
  for(long r=0;r<reps;r++) tile<MI,NJ,MODE>(x,w,K,out);
  double s=now()-t0; printf("MI=%d NJ=%d MODE=%d K=%ld: %.1f GMAC/s (%g)\n",MI,NJ,MODE,K, reps*MI*NJ*K/s/1e9, out[0]);
}
int main(){ for(int r=0;r<2;r++){ run<2,3,0>(576); run<2,3,3>(576); run<2,3,1>(576); run<2,3,0>(1536); run<2,3,3>(1536); run<2,3,1>(1536);} }
