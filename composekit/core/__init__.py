"""The method: options, scheduler, sampler, geometry, preprocessing, the classic method, component specs."""
