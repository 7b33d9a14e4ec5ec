import inspect, triton
from triton.compiler import compiler
print("triton", triton.__version__)
print(inspect.getsource(compiler.CompiledKernel.__getitem__))
print(inspect.getsource(compiler.CompiledKernel.launch_metadata))
try:
    print(inspect.getsource(compiler.CompiledKernel._init_handles))
except Exception as e: print(e)
import triton.backends.nvidia.driver as d
print(inspect.getsource(d.CudaLauncher))
from triton import knobs
print(inspect.getsource(knobs.HookChain) if hasattr(knobs, "HookChain") else "no HookChain")
print(repr(knobs.runtime.launch_enter_hook))
