#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <stdint.h>
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}
int main(){
 long n=200000000;
 { __m256i a[12]; __m256i x=_mm256_set1_epi8(3), y=_mm256_set1_epi8(5);
   for(int i=0;i<12;i++) a[i]=_mm256_set1_epi32(i);
   double t0=now();
   for(long r=0;r<n;r++){
   #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm256_dpbusd_epi32(a[i],x,y);
    __asm__ volatile("" : "+x"(x));
   }
   double s=now()-t0; long o=0; for(int i=0;i<12;i++) o+=_mm256_extract_epi32(a[i],0);
   printf("ymm vpdpbusd reg: %.2f G/s = %.1f GMAC/s (%ld)\n", n*12/s/1e9, n*12*32/s/1e9, o); }
 { __m512i a[12]; __m512i x=_mm512_set1_epi8(3), y=_mm512_set1_epi8(5);
   for(int i=0;i<12;i++) a[i]=_mm512_set1_epi32(i);
   double t0=now();
   for(long r=0;r<n/2;r++){
   #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm512_dpbusd_epi32(a[i],x,y);
    __asm__ volatile("" : "+v"(x));
   }
   double s=now()-t0; long o=0; int32_t t[16]; for(int i=0;i<12;i++){_mm512_storeu_si512(t,a[i]); o+=t[0];}
   printf("zmm vpdpbusd reg: %.2f G/s = %.1f GMAC/s (%ld)\n", n/2*12/s/1e9, n/2*12*64/s/1e9, o); }
 { // broadcast operand from memory, 8 weight vectors x 8 rows (as the x8 tile at R=8)
   __m256i a[8]; __m256i w[2]; int32_t xs[64]; for(int i=0;i<64;i++) xs[i]=i*77;
   for(int i=0;i<8;i++) a[i]=_mm256_set1_epi32(i);
   w[0]=_mm256_set1_epi8(3); w[1]=_mm256_set1_epi8(7);
   double t0=now();
   for(long r=0;r<n/8;r++){
     for(int v=0;v<2;v++){
     #pragma GCC unroll 8
     for(int i=0;i<8;i++){ a[i]=_mm256_dpbusd_epi32(a[i],w[v],_mm256_set1_epi32(xs[8*i+v])); }
     }
     __asm__ volatile("" : "+x"(w[0]), "+x"(w[1]));
     __asm__ volatile("" ::: "memory");
   }
   double s=now()-t0; long o=0; for(int i=0;i<8;i++) o+=_mm256_extract_epi32(a[i],0);
   printf("ymm vpdpbusd bcast mem (8 chains): %.2f G/s = %.1f GMAC/s (%ld)\n", n/8*16/s/1e9, n/8*16*32/s/1e9, o); }
}
