"""export: fold versatile layers into plain convs, write ONNX, prove it in onnxruntime, quantize."""
