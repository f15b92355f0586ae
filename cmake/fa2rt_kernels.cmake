# Ahead-of-time kernel images: runs the Triton AOT compiler (a build-time requirement only) for the given archs
# and installs the images with their manifest into the package's kernels/ folder.
function(fa2rt_add_kernel_images archs)
  set(out "${CMAKE_CURRENT_BINARY_DIR}/kernels")
  if(archs STREQUAL "")
    message(STATUS "fa2rt: FA2RT_ARCHS is empty, building no kernel images")
    return()
  endif()
  file(GLOB kernel_sources CONFIGURE_DEPENDS
    "${CMAKE_CURRENT_SOURCE_DIR}/backends/kernels/*.py"
    "${CMAKE_CURRENT_SOURCE_DIR}/backends/cuda/*.json"
    "${CMAKE_CURRENT_SOURCE_DIR}/backends/rocm/*.json")
  # The manifest's schema version is defined there (read by aot.py).
  list(APPEND kernel_sources "${CMAKE_CURRENT_SOURCE_DIR}/python/fa2rt/schema.py")
  add_custom_command(
    OUTPUT "${out}/manifest.json"
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/backends/kernels/aot.py" --archs "${archs}" --out "${out}"
    DEPENDS ${kernel_sources}
    COMMENT "fa2rt: compiling kernel images for ${archs}"
    VERBATIM)
  add_custom_target(fa2rt_kernel_images ALL DEPENDS "${out}/manifest.json")
  install(DIRECTORY "${out}/" DESTINATION fa2rt/kernels)
endfunction()
