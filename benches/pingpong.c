/* Bare ping-pong between two processes over a Unix socketpair: the floor under one
 * opsagent Apply round trip (request 230 bytes, reply 164, as for a linux.file state).
 *
 *   cc -O2 benches/pingpong.c -o /tmp/pingpong
 *   /tmp/pingpong 20000              # wherever the scheduler puts the two processes
 *   taskset -c 1 /tmp/pingpong 20000 # both on one CPU (the child inherits the mask)
 */
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
#include <time.h>
#include <stdlib.h>
int main(int argc,char**argv){int n=atoi(argv[1]);int sv[2];socketpair(AF_UNIX,SOCK_STREAM,0,sv);char buf[256]={0};
if(fork()==0){for(int i=0;i<n;i++){read(sv[1],buf,230);write(sv[1],buf,164);}return 0;}
struct timespec a,b;clock_gettime(CLOCK_MONOTONIC,&a);
for(int i=0;i<n;i++){write(sv[0],buf,230);read(sv[0],buf,164);}
clock_gettime(CLOCK_MONOTONIC,&b);printf("%.2f us per round trip\n",((b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec))/n/1e3);return 0;}
