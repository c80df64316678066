#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <stdint.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}
#define N 100000000L
__attribute__((noinline)) void chains8_reg(){
   __m256i a[8]; __m256i x=_mm256_set1_epi8(3), y=_mm256_set1_epi8(5);
   for(int i=0;i<8;i++) a[i]=_mm256_set1_epi32(i);
   double t0=now();
   for(long r=0;r<N;r++){
   #pragma GCC unroll 8
    for(int i=0;i<8;i++) a[i]=_mm256_dpbusd_epi32(a[i],x,y);
    __asm__ volatile("" : "+x"(x));
   }
   double s=now()-t0; long o=0; for(int i=0;i<8;i++) o+=_mm256_extract_epi32(a[i],0);
   printf("ymm 8 chains reg: %.2f G/s (%ld)\n", N*8/s/1e9, o); }
__attribute__((noinline)) void chains4_reg(){
   __m256i a[4]; __m256i x=_mm256_set1_epi8(3), y=_mm256_set1_epi8(5);
   for(int i=0;i<4;i++) a[i]=_mm256_set1_epi32(i);
   double t0=now();
   for(long r=0;r<N;r++){
   #pragma GCC unroll 8
    for(int i=0;i<4;i++) a[i]=_mm256_dpbusd_epi32(a[i],x,y);
    __asm__ volatile("" : "+x"(x));
   }
   double s=now()-t0; long o=0; for(int i=0;i<4;i++) o+=_mm256_extract_epi32(a[i],0);
   printf("ymm 4 chains reg: %.2f G/s (%ld)\n", N*4/s/1e9, o); }
__attribute__((noinline)) void chains1_reg(){
   __m256i a; __m256i x=_mm256_set1_epi8(3), y=_mm256_set1_epi8(5);
   a=_mm256_set1_epi32(1);
   double t0=now();
   for(long r=0;r<N;r++){
    a=_mm256_dpbusd_epi32(a,x,y);
    __asm__ volatile("" : "+x"(x));
   }
   double s=now()-t0; 
   printf("ymm 1 chain: %.2f G/s -> latency %.2f ns (%d)\n", N/s/1e9, s/N*1e9, _mm256_extract_epi32(a,0)); }
__attribute__((noinline)) void chains12_bcast(int32_t* xs){
   __m256i a[12]; __m256i w=_mm256_set1_epi8(3);
   for(int i=0;i<12;i++) a[i]=_mm256_set1_epi32(i);
   double t0=now();
   for(long r=0;r<N;r++){
   #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm256_dpbusd_epi32(a[i],w,_mm256_set1_epi32(xs[i]));
    __asm__ volatile("" : "+x"(w), "+r"(xs));
   }
   double s=now()-t0; long o=0; for(int i=0;i<12;i++) o+=_mm256_extract_epi32(a[i],0);
   printf("ymm 12 chains bcast: %.2f G/s (%ld)\n", N*12/s/1e9, o); }
__attribute__((noinline)) void zmm_bcast(int32_t* xs){
   __m512i a[12]; __m512i w=_mm512_set1_epi8(3);
   for(int i=0;i<12;i++) a[i]=_mm512_set1_epi32(i);
   double t0=now();
   for(long r=0;r<N/2;r++){
   #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm512_dpbusd_epi32(a[i],w,_mm512_set1_epi32(xs[i]));
    __asm__ volatile("" : "+v"(w), "+r"(xs));
   }
   double s=now()-t0; long o=0; int32_t t[16]; for(int i=0;i<12;i++){_mm512_storeu_si512(t,a[i]); o+=t[0];}
   printf("zmm 12 chains bcast: %.2f G/s = x2 ymm-equiv %.2f (%ld)\n", N/2*12/s/1e9, N*12/s/1e9, o); }
__attribute__((noinline)) void zmm_bcast8(int32_t* xs){
   __m512i a[8]; __m512i w=_mm512_set1_epi8(3);
   for(int i=0;i<8;i++) a[i]=_mm512_set1_epi32(i);
   double t0=now();
   for(long r=0;r<N/2;r++){
   #pragma GCC unroll 8
    for(int i=0;i<8;i++) a[i]=_mm512_dpbusd_epi32(a[i],w,_mm512_set1_epi32(xs[i]));
    __asm__ volatile("" : "+v"(w), "+r"(xs));
   }
   double s=now()-t0; long o=0; int32_t t[16]; for(int i=0;i<8;i++){_mm512_storeu_si512(t,a[i]); o+=t[0];}
   printf("zmm 8 chains bcast: %.2f G/s = x2 ymm-equiv %.2f (%ld)\n", N/2*8/s/1e9, N*8/s/1e9, o); }
int main(){ int32_t xs[64]; for(int i=0;i<64;i++) xs[i]=i*77;
 chains1_reg(); chains4_reg(); chains8_reg(); chains12_bcast(xs); zmm_bcast(xs); zmm_bcast8(xs); }
