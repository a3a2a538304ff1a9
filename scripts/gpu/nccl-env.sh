# Sourced by the GPU bundle's run scripts: keeps NVLink multicast off (NCCL_NVLS_ENABLE=0; the native
# code forces it too) and puts the folder of libnccl.so.2 on LD_LIBRARY_PATH. On the GPU machine
# NCCL comes with PyTorch's pip wheel (site-packages/nvidia/nccl/lib); SNELLA_NCCL_LIB_DIR wins.
export NCCL_NVLS_ENABLE=0
nccl_dir=${SNELLA_NCCL_LIB_DIR:-}
if [ -z "$nccl_dir" ]; then
  nccl_lib=$(find /opt /usr /root /home -name 'libnccl.so.2*' -type f 2>/dev/null | head -1)
  [ -z "$nccl_lib" ] && nccl_lib=$(find / -xdev -name 'libnccl.so*' -type f 2>/dev/null | head -1)
  [ -n "$nccl_lib" ] && nccl_dir=$(dirname "$nccl_lib")
fi
if [ -n "$nccl_dir" ]; then
  export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "NCCL: $nccl_dir ($(ls "$nccl_dir" | grep -m1 libnccl))"
else
  echo "NCCL: libnccl.so.2 not found on this machine (the NCCL tests will fail naming the paths tried)"
fi
