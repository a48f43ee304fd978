# Compiler flags shared by every dauth target, through the interface library dauth_build_flags.
add_library(dauth_build_flags INTERFACE)
target_compile_options(dauth_build_flags INTERFACE -Wall -Wextra -Wpedantic -Wshadow -Wconversion-null
  -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Wformat=2 -Wimplicit-fallthrough)
if(DAUTH_WERROR)
  target_compile_options(dauth_build_flags INTERFACE -Werror)
endif()
# Hardening the Debian way: fortified libc calls, stack protector, PIE, full RELRO.
target_compile_definitions(dauth_build_flags INTERFACE $<$<NOT:$<CONFIG:Debug>>:_FORTIFY_SOURCE=2>)
target_compile_options(dauth_build_flags INTERFACE -fstack-protector-strong -fPIE)
target_link_options(dauth_build_flags INTERFACE -pie -Wl,-z,relro -Wl,-z,now)

if(DAUTH_SANITIZE)
  # ASan + UBSan for the whole tree, dependencies excluded. UBSan findings abort so that ctest fails on them.
  set(_dauth_san -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  add_compile_options(${_dauth_san})
  add_link_options(-fsanitize=address,undefined)
endif()
