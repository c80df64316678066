#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){ __m256 a[12]; __m256 x=_mm256_set1_ps(1.0000001f), y=_mm256_set1_ps(0.9999999f);
 for(int i=0;i<12;i++) a[i]=_mm256_set1_ps(i);
 struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
 long n=400000000;
 for(long r=0;r<n;r++){
 #pragma GCC unroll 12
  for(int i=0;i<12;i++) a[i]=_mm256_fmadd_ps(a[i],x,y);

 }
 clock_gettime(CLOCK_MONOTONIC,&t1); double s=(t1.tv_sec-t0.tv_sec)+1e-9*(t1.tv_nsec-t0.tv_nsec);
 float o=0; for(int i=0;i<12;i++) o+=a[i][0];
 printf("%.1f G fma/s = %.1f GMAC/s (%f)\n", n*12/s/1e9, n*12*8/s/1e9, o); }
