//! safetensors reading and atomic writing (filled in below).
